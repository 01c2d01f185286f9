"""How often a draft's argmax equals the target's along the target's own greedy continuation, by
position: where speculative decoding's acceptance comes from, and where it goes (e.g. past the
row length both models were trained on). One JSON line.

    python benchmarks/draft_agreement.py [--target runs/distill_tiny_teacher] [--draft runs/distill_tiny_draft]
                                         [--new_tokens 256] [--buckets 96,128,192]

The target continues each prompt of benchmarks/speculative.py greedily; both models then score the
whole sequence in one uncached pass, and the fraction of positions where their argmaxes agree is
reported per bucket of positions (the prompt's own positions are left out).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import decoding, restore
from jaxllm.models import Transformer

from speculative import prompt_ids


def greedy_tokens(model_cfg, params, sequence) -> np.ndarray:
    """The argmax next token at every position of `sequence`, one uncached forward pass."""
    tokens = np.array([sequence], np.int32)
    positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
    logits = Transformer(model_cfg).apply({"params": params}, tokens, np.ones_like(tokens), positions)
    return np.asarray(jnp.argmax(logits, axis=-1))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="runs/distill_tiny_teacher")
    parser.add_argument("--draft", default="runs/distill_tiny_draft")
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--buckets", default="96,128,192", help="bucket edges in positions")
    args = parser.parse_args()
    target_cfg, target_params = restore.load_params(args.target)
    draft_cfg, draft_params = restore.load_params(args.draft)
    prompts = prompt_ids()
    sampling = decoding.SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eos=False)
    continuations = decoding.Generator(target_cfg.model).generate(target_params, prompts, sampling, jax.random.key(0))
    edges = [int(e) for e in args.buckets.split(",")]
    names = [f"{lo}-{hi}" for lo, hi in zip(["prompt"] + edges, edges + ["end"])]
    agreements: dict[str, list[bool]] = {name: [] for name in names}
    for prompt, continuation in zip(prompts, continuations):
        sequence = prompt + continuation
        # The prediction at position j - 1 is of token j: compare those of the generated tokens.
        agree = greedy_tokens(target_cfg.model, target_params, sequence) == greedy_tokens(
            draft_cfg.model, draft_params, sequence)
        for j in range(len(prompt), len(sequence)):
            agreements[names[sum(e <= j for e in edges)]].append(bool(agree[j - 1]))
    print(json.dumps({"benchmark": "draft_agreement", "target": args.target, "draft": args.draft,
                      "trained_seq_len": {"target": target_cfg.train.seq_len, "draft": draft_cfg.train.seq_len},
                      "agreement_by_positions": {name: round(float(np.mean(a)), 3)
                                                 for name, a in agreements.items() if a}}))


if __name__ == "__main__":
    main()
