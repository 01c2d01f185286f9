"""Evaluate (or sample from) a prediction ensemble of run directories; prints JSON with each
member's and the ensemble's metrics (loss and bits per byte, or accuracy and macro-F1).

    python -m jaxllm.ensemble --workdir runs/a --workdir runs/b [--weights 2 1] \
        [--rule mean_prob|mean_logit|vote] [--eval_batches 8 --first_batch 0 --batch_stride 1] [--prompt "def " --max_new_tokens 64]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import jax

from jaxllm import tokenizer as tokenizer_lib
from jaxllm.combine import ensemble
from jaxllm.combine.generation import EnsembleGenerator
from jaxllm.config import ConfigError
from jaxllm.decoding import SamplingConfig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate or sample from an ensemble of jaxllm runs.")
    parser.add_argument("--workdir", action="append", required=True, help="repeat: one per member")
    parser.add_argument("--weights", type=float, nargs="+", help="one per member (normalised); default equal")
    parser.add_argument("--rule", default="mean_prob", help=f"one of {', '.join(ensemble.RULES)}")
    parser.add_argument("--eval_batches", type=int, default=8)
    parser.add_argument("--first_batch", type=int, default=0, help="skip this many validation batches")
    parser.add_argument("--batch_stride", type=int, default=1,
                        help="evaluate batches first, first + stride, ... (2: every other batch)")
    parser.add_argument("--prompt", action="append", help="sample from the ensemble instead (language models)")
    parser.add_argument("--max_new_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        indices = ensemble.batch_indices(args.eval_batches, args.first_batch, args.batch_stride)  # before loading
        ens = ensemble.load(args.workdir, args.rule, args.weights)
        if args.prompt:
            cfg = ens.cfgs[0]
            if cfg.family != "causal_lm":
                raise ConfigError(f"--prompt samples from language models; {args.workdir[0]} is a {cfg.family} run")
            tok = tokenizer_lib.load(cfg.model.tokenizer)
            gen = EnsembleGenerator([c.model for c in ens.cfgs], ens.weights, ens.rule, ens.mesh)
            sampling = SamplingConfig(args.max_new_tokens, args.temperature)
            outputs = gen.generate(ens.params, [tokenizer_lib.prompt_ids(tok, p) for p in args.prompt],
                                   sampling, jax.random.key(args.seed))
            for prompt, generated in zip(args.prompt, outputs):
                print(json.dumps({"prompt": prompt, "text": prompt + tok.decode(generated)}))
            return
        report = ensemble.evaluate(ens, indices)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
