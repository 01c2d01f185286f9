"""Sample from a run directory's checkpoint (float or int8), optionally sharded over devices.

    python -m jaxllm.generate --workdir runs/tiny_lm --prompt "def "
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax

from jaxllm import restore
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.config import ConfigError
from jaxllm.decoding import PADDING_SIDES, Generator, SamplingConfig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample from a jaxllm checkpoint.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--prompt", action="append", help="repeat for a batch of prompts")
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--padding", choices=PADDING_SIDES, default="left")
    parser.add_argument("--tensor", type=int, default=1,
                        help="shard heads and MLP over this many devices (batch over the rest)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 0:
        parser.error(f"--max_new_tokens {args.max_new_tokens} must be 0 or more")
    if args.temperature < 0:
        parser.error(f"--temperature {args.temperature} must be 0 (greedy) or positive")
    if args.top_k < 0:
        parser.error(f"--top_k {args.top_k} must be 0 (off) or positive")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top_p {args.top_p} must be in (0, 1]")
    if args.tensor < 1:
        parser.error(f"--tensor {args.tensor} must be 1 or more")
    prompts = args.prompt or [""]
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    try:
        cfg, params = restore.load_params(args.workdir, tensor=args.tensor)
    except (FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if args.top_k > cfg.model.vocab_size:
        parser.error(f"--top_k {args.top_k} is larger than the vocabulary ({cfg.model.vocab_size})")
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    ids = [tokenizer_lib.prompt_ids(tok, p) for p in prompts]
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    outputs = Generator(cfg.model, mesh).generate(
        params, ids, sampling, jax.random.key(args.seed), padding=args.padding
    )
    for prompt, generated in zip(prompts, outputs):
        print(prompt + tok.decode(generated))
        if len(prompts) > 1:
            print("-" * 40)


if __name__ == "__main__":
    main()
