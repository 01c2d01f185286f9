"""Mixed-length requests: continuous batching vs padded static batches vs one at a time. One
JSON object per line.

    python benchmarks/continuous_batching.py [--workdir runs/distill_tiny_teacher] [--prompts 32]
        [--min_prompt 16] [--max_prompt 256] [--min_new 8] [--max_new 64] [--slots 8] [--repeats 3] [--breakdown]

Requests: --prompts prompts cut from the stdlib corpus, lengths uniform in [min_prompt,
max_prompt], each with its own limit of new tokens uniform in [min_new, max_new] (seed 0), greedy.
- continuous: `ContinuousBatcher` with --slots rows; a finished row takes the next request.
- padded: the requests in arrival order in batches of --slots, each batch left-padded to its
  longest prompt and decoded by `Generator.generate` until its largest limit (what a static batch
  does; the tokens past a request's own limit are thrown away). Its decode loop reads every new
  token back to the host.
- static_device_loop: the same batches of --slots, each decoded by `ContinuousBatcher` (its
  on-device loop, no refill: a batch runs until its longest request ends), to separate the gain of
  refilling rows from that of the on-device loop.
- one_at_a_time: `ContinuousBatcher` with one slot (the same bucketed prefill and on-device loop,
  one request at a time).
Each mode runs once untimed (compilation), then the modes take turns --repeats times; the median
seconds is reported, tokens/s counts the requested tokens. Every mode must give the same tokens
as one_at_a_time (`same_tokens`). --breakdown then runs continuous and one_at_a_time once more,
waiting for every prefill (admission) and decode call to finish, and prints the seconds of each
(the waiting costs some overlap, so their sum exceeds the timed runs').
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
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
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--breakdown", action="store_true", help="also time prefill and decode calls apart")
    args = parser.parse_args()
    if not 1 <= args.min_prompt <= args.max_prompt or not 1 <= args.min_new <= args.max_new or min(
            args.prompts, args.slots, args.repeats) < 1:
        parser.error("need 1 <= min_prompt <= max_prompt, 1 <= min_new <= max_new, and prompts, slots, repeats >= 1")
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
    batches = [slice(i, i + args.slots) for i in range(0, len(prompts), args.slots)]
    decode_steps: dict = {}

    def padded():
        out, steps = [], 0
        for b in batches:
            most = max(limits[b])
            results = static.generate(params, prompts[b], decoding.SamplingConfig(most, 0.0, stop_at_eos=False),
                                      jax.random.key(0))
            out += [r[:n] for r, n in zip(results, limits[b])]
            steps += most - 1  # the first token comes from the prefill
        decode_steps["padded"] = steps
        return out

    def static_device_loop():
        out, steps = [], 0
        for b in batches:
            out += continuous.generate(params, prompts[b], sampling, jax.random.key(0), limits[b])
            steps += continuous.last_stats["decode_steps"]
        decode_steps["static_device_loop"] = steps
        return out

    def batcher_mode(name, batcher):
        def run():
            out = batcher.generate(params, prompts, sampling, jax.random.key(0), limits)
            decode_steps[name] = batcher.last_stats["decode_steps"]
            return out
        return run

    modes = {
        "continuous": batcher_mode("continuous", continuous),
        "padded": padded,
        "static_device_loop": static_device_loop,
        "one_at_a_time": batcher_mode("one_at_a_time", single),
    }
    outputs, seconds = {}, {name: [] for name in modes}
    for repeat in range(args.repeats + 1):  # repeat 0 compiles
        for name, run in modes.items():
            start = time.perf_counter()
            outputs[name] = run()
            if repeat:
                seconds[name].append(time.perf_counter() - start)
    tokens = sum(limits)
    for name in modes:
        median = statistics.median(seconds[name])
        print(json.dumps({
            "benchmark": "continuous_batching", "mode": name, "prompts": args.prompts, "slots": args.slots,
            "prompt_lengths": [args.min_prompt, args.max_prompt], "new_token_limits": [args.min_new, args.max_new],
            "prompt_tokens": int(sum(lengths)), "requested_tokens": tokens, "decode_steps": decode_steps[name],
            "repeats": args.repeats, "seconds": median, "seconds_all": seconds[name], "tokens_per_s": tokens / median,
            "same_tokens": outputs[name] == outputs["one_at_a_time"], "load_average": os.getloadavg(),
            "devices": str(jax.devices()),
        }), flush=True)
    if args.breakdown:
        for name, batcher in (("continuous", continuous), ("one_at_a_time", single)):
            print(json.dumps({"benchmark": "continuous_batching_breakdown", "mode": name, "slots": batcher.slots,
                              **breakdown(batcher, params, prompts, sampling, limits)}), flush=True)


def breakdown(batcher, params, prompts, sampling, limits) -> dict:
    """Seconds in prefill (admission) calls, per (rows, length) bucket, and in decode calls of one
    `generate`, each call waited for."""
    seconds, calls = collections.defaultdict(float), collections.Counter()

    def timed(fn, key):
        def run(*args):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            name = key(args)
            seconds[name] += time.perf_counter() - start
            calls[name] += 1
            return out
        return run

    # Instance attributes shadow the jitted methods for this call only.
    batcher.admit = timed(batcher.admit, lambda args: "prefill_%dx%d" % args[5].shape)
    batcher.decode = timed(batcher.decode, lambda args: "decode")
    try:
        start = time.perf_counter()
        batcher.generate(params, prompts, sampling, jax.random.key(0), limits)
        total = time.perf_counter() - start
    finally:
        del batcher.admit, batcher.decode
    return {"seconds": total, "decode_steps": batcher.last_stats["decode_steps"], "calls_seconds": dict(seconds),
            "calls": dict(calls), "load_average": os.getloadavg()}


if __name__ == "__main__":
    main()
