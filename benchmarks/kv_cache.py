"""The int8 KV cache (model.kv_cache_dtype=int8) vs float32 and bfloat16 caches: cache bytes,
decode step time after a long prompt, and greedy agreement with the float32 cache. One JSON
object per line.

    python benchmarks/kv_cache.py [--workdir runs/distill_tiny_teacher] [--prompt 2048] [--new_tokens 32] [--repeats 3]

The prompt is cut from the stdlib corpus (byte tokenizer). Every cache kind runs one untimed
greedy generation (compilation), then the kinds take turns --repeats times; `decode_step_s` is the
median over all timed decode steps. The model computes in float32 throughout; only the cache's
storage changes.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import statistics
import sysconfig

import jax
import numpy as np

from jaxllm import data, decoding, restore


def corpus_prompt(n: int) -> list[int]:
    """n - 1 bytes of the standard library's source after BOS."""
    text = b""
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, "rb") as f:
            text += f.read()
        if len(text) >= n:
            break
    return [data.BOS_ID] + list(text[:n - 1])


def cache_bytes(cache) -> int:
    return sum(leaf.size * leaf.dtype.itemsize for path, leaf in jax.tree_util.tree_leaves_with_path(cache)
               if path[-1].key in ("key", "value", "key_scale", "value_scale"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/distill_tiny_teacher")
    parser.add_argument("--prompt", type=int, default=2048)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg, params = restore.load_params(args.workdir)
    prompt = corpus_prompt(args.prompt)
    sampling = decoding.SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eos=False)
    kinds = ("float32", "bfloat16", "int8")
    gens = {k: decoding.Generator(dataclasses.replace(cfg.model, kv_cache_dtype=k)) for k in kinds}
    steps, outputs = {k: [] for k in kinds}, {}
    for repeat in range(args.repeats + 1):
        for kind, gen in gens.items():
            outputs[kind] = gen.generate(params, [prompt], sampling, jax.random.key(0))[0]
            if repeat:
                steps[kind] += gen.last_timings["step_s"]
    T = args.prompt + args.new_tokens
    sizes = {k: cache_bytes(jax.eval_shape(lambda g=g: g.init_cache(1, T))) for k, g in gens.items()}
    for kind in kinds:
        step = statistics.median(steps[kind])
        print(json.dumps({
            "benchmark": "kv_cache", "kv_cache_dtype": kind, "prompt": args.prompt, "new_tokens": args.new_tokens,
            "cache_bytes": sizes[kind], "bytes_vs_bfloat16": sizes[kind] / sizes["bfloat16"],
            "decode_step_s": step, "tokens_per_s": 1 / step,
            "greedy_agreement_vs_float32": float(np.mean(np.array(outputs[kind]) == np.array(outputs["float32"]))),
            "devices": str(jax.devices()),
        }), flush=True)


if __name__ == "__main__":
    main()
