"""Mixed-length requests: continuous batching vs padded static batches vs one at a time. One
JSON object per line.

    python benchmarks/continuous_batching.py [--workdir runs/distill_tiny_teacher] [--prompts 32]
        [--min_prompt 16] [--max_prompt 256] [--min_new 8] [--max_new 64] [--slots 8]

Requests: --prompts prompts cut from the stdlib corpus, lengths uniform in [min_prompt,
max_prompt], each with its own limit of new tokens uniform in [min_new, max_new] (seed 0), greedy.
- continuous: `ContinuousBatcher` with --slots rows; a finished row takes the next request.
- padded: the requests in arrival order in batches of --slots, each batch left-padded to its
  longest prompt and decoded by `Generator.generate` until its largest limit (what a static batch
  does; the tokens past a request's own limit are thrown away).
- one_at_a_time: `ContinuousBatcher` with one slot (the same bucketed prefill, one request at a
  time).
Each mode runs once untimed (compilation), then once timed; tokens/s counts the requested tokens.
All three give the same tokens (checked: `same_tokens`).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from jaxllm import batching, data, decoding, restore

from kv_cache import corpus_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/distill_tiny_teacher")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--min_prompt", type=int, default=16)
    parser.add_argument("--max_prompt", type=int, default=256)
    parser.add_argument("--min_new", type=int, default=8)
    parser.add_argument("--max_new", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args()
    cfg, params = restore.load_params(args.workdir)
    rng = np.random.default_rng(0)
    corpus = corpus_prompt(args.prompts * args.max_prompt + 1)[1:]
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, args.prompts)
    limits = [int(n) for n in rng.integers(args.min_new, args.max_new + 1, args.prompts)]
    prompts = [[data.BOS_ID] + corpus[i * args.max_prompt:i * args.max_prompt + n - 1]
               for i, n in enumerate(lengths)]
    sampling = decoding.SamplingConfig(max_new_tokens=args.max_new, temperature=0.0, stop_at_eos=False)
    continuous = batching.ContinuousBatcher(cfg.model, args.slots)
    single = batching.ContinuousBatcher(cfg.model, 1)
    static = decoding.Generator(cfg.model)

    def padded():
        out = []
        for i in range(0, len(prompts), args.slots):
            batch = prompts[i:i + args.slots]
            most = max(limits[i:i + args.slots])
            results = static.generate(params, batch, decoding.SamplingConfig(most, 0.0, stop_at_eos=False),
                                      jax.random.key(0))
            out += [r[:n] for r, n in zip(results, limits[i:i + args.slots])]
        return out

    modes = {
        "continuous": lambda: continuous.generate(params, prompts, sampling, jax.random.key(0), limits),
        "padded": padded,
        "one_at_a_time": lambda: single.generate(params, prompts, sampling, jax.random.key(0), limits),
    }
    outputs, seconds = {}, {}
    for name, run in modes.items():
        run()  # compilation
        start = time.perf_counter()
        outputs[name] = run()
        seconds[name] = time.perf_counter() - start
    tokens = sum(limits)
    for name in modes:
        print(json.dumps({
            "benchmark": "continuous_batching", "mode": name, "prompts": args.prompts, "slots": args.slots,
            "prompt_lengths": [args.min_prompt, args.max_prompt], "new_token_limits": [args.min_new, args.max_new],
            "requested_tokens": tokens, "seconds": seconds[name], "tokens_per_s": tokens / seconds[name],
            "same_tokens": outputs[name] == outputs["one_at_a_time"], "devices": str(jax.devices()),
        }), flush=True)


if __name__ == "__main__":
    main()
