"""Speculative decoding vs plain decoding of the target: tokens/s and acceptance rate, with the
distilled student of experiments/distill_tiny.py as the draft and with an untrained draft of the
student's shape. One JSON object per line.

    python experiments/distill_tiny.py                    # the teacher and the distilled student, if missing
    python benchmarks/speculative.py [--target runs/distill_tiny_teacher] [--draft runs/distill_tiny]
                                     [--gammas 2,4] [--new_tokens 64] [--repeats 3]

Batch 1, one prompt at a time (prompts of one length, cut from the stdlib corpus, so that every
configuration compiles once). Every configuration runs once untimed (compilation), then the
configurations take turns --repeats times; the median of the repeats' total seconds is reported.
At temperature 0 `same_as_plain` checks the output is the target's greedy output token for token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import data, decoding, restore, speculative
from jaxllm.models import Transformer

PROMPTS = ["import os\nimport sys\n\n\ndef ", "class Parser:\n    def __init__(self, ",
           "    for name in names:\n        if ", "    return self._cache[key]\n\n\ndef ",
           "        except KeyError:\n            ", "# Copyright 2001 Python Software Fo"]
PROMPT_CHARS = 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="runs/distill_tiny_teacher")
    parser.add_argument("--draft", default="runs/distill_tiny")
    parser.add_argument("--gammas", default="2,4")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the built-in prompts")
    args = parser.parse_args()
    target_cfg, target_params = restore.load_params(args.target)
    draft_cfg, draft_params = restore.load_params(args.draft)
    untrained = nn.meta.unbox(Transformer(draft_cfg.model).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    prompts = [[data.BOS_ID] + list(p[:PROMPT_CHARS].encode()) for p in PROMPTS[:args.prompts]]
    gammas = [int(g) for g in args.gammas.split(",")]

    for temperature in (float(t) for t in args.temperatures.split(",")):
        sampling = decoding.SamplingConfig(max_new_tokens=args.new_tokens, temperature=temperature, stop_at_eos=False)
        plain = decoding.Generator(target_cfg.model)
        runs = {"plain": lambda p, k: (plain.generate(target_params, [p], sampling, k)[0], None)}
        for gamma in gammas:
            spec = speculative.SpeculativeGenerator(target_cfg.model, draft_cfg.model, gamma)
            for name, params in (("distilled", draft_params), ("untrained", untrained)):
                def run(p, k, spec=spec, params=params):
                    return spec.generate(target_params, params, [p], sampling, k)[0], dict(spec.last_stats)
                runs[f"{name}_gamma{gamma}"] = run
        seconds = {name: [] for name in runs}
        outputs, stats = {}, {name: [] for name in runs}
        for repeat in range(args.repeats + 1):  # repeat 0 compiles
            for name, run in runs.items():
                start = time.perf_counter()
                results = [run(p, jax.random.key(i)) for i, p in enumerate(prompts)]
                if repeat:
                    seconds[name].append(time.perf_counter() - start)
                    stats[name] = [s for _, s in results]
                outputs[name] = [out for out, _ in results]
        tokens = sum(len(out) for out in outputs["plain"])
        plain_s = statistics.median(seconds["plain"])
        for name in runs:
            s = statistics.median(seconds[name])
            record = {"benchmark": "speculative", "config": name, "temperature": temperature,
                      "prompts": len(prompts), "new_tokens": args.new_tokens, "tokens_per_s": tokens / s,
                      "speedup_vs_plain": plain_s / s, "seconds": seconds[name]}
            if stats[name][0] is not None:
                drafted = sum(x["drafted"] for x in stats[name])
                record["acceptance_rate"] = sum(x["accepted"] for x in stats[name]) / drafted
                record["tokens_per_round"] = statistics.mean(x["tokens_per_round"] for x in stats[name])
                if temperature == 0:
                    record["same_as_plain"] = outputs[name] == outputs["plain"]
            print(json.dumps(record), flush=True)
    print(json.dumps({"benchmark": "speculative", "target": args.target, "draft": args.draft,
                      "target_params": sum(x.size for x in jax.tree.leaves(target_params)),
                      "draft_params": sum(x.size for x in jax.tree.leaves(draft_params)),
                      "devices": str(jax.devices())}), flush=True)


if __name__ == "__main__":
    main()
