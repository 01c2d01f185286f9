"""Multi-head latent attention vs grouped-query attention at the same width: KV-cache bytes per
token and cached greedy decoding speed. One JSON object per line.

    python benchmarks/mla_decode.py [--batch 8] [--prompt 192] [--new_tokens 64] [--repeats 5]

Models (randomly initialised; decoding cost does not depend on the weights): tiny_lm's width
(d256, 4 layers, 4 query heads of 64) with
- `gqa_mha`: 4 KV heads (tiny_lm itself), `gqa_kv2`: 2 KV heads, `gqa_kv1`: one (multi-query);
- `mla`: multi-head latent attention with a 64-wide KV latent (a quarter of the width), a 32-wide
  shared RoPE key (half a head, as in DeepSeek-V3), 64 + 32 query/key head dims and 64-wide
  values, decoded with the up-projections absorbed.

Each round runs one whole `Generator.generate` (prompt pass + --new_tokens steps) of every model in
turn, after one untimed run each (compilation); `decode_step_s` is the median over rounds of each
run's median step time, `tokens_per_s` = batch / decode_step_s. `kv_cache_bytes_per_token` counts
every layer (float32 cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import tiny_lm  # noqa: E402
from train_throughput import machine_info  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import decoding  # noqa: E402
from jaxllm.models.transformer import Transformer  # noqa: E402


def model_configs() -> dict[str, config_lib.ModelConfig]:
    base = tiny_lm.get_config().model
    mla = config_lib.MlaConfig(q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=64, qk_rope_head_dim=32,
                               v_head_dim=64)
    return {
        "gqa_mha": dataclasses.replace(base, num_kv_heads=4),
        "gqa_kv2": dataclasses.replace(base, num_kv_heads=2),
        "gqa_kv1": dataclasses.replace(base, num_kv_heads=1),
        "mla": dataclasses.replace(base, attention_layer="mla", mla=mla),
    }


def cache_bytes_per_token(gen: decoding.Generator, batch: int, length: int) -> int:
    """Bytes of the per-token cache arrays (every layer), per token."""
    shapes = jax.eval_shape(lambda: gen.init_cache(batch, length))
    per_token = [s for s in jax.tree.leaves(shapes) if s.ndim >= 2 and length in s.shape and s.dtype != np.int32]
    return sum(s.size * s.dtype.itemsize for s in per_token) // (batch * length)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=192)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, 256, args.prompt)) for _ in range(args.batch)]
    sampling = decoding.SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, stop_at_eos=False)
    runs = {}
    for name, cfg in model_configs().items():
        gen = decoding.Generator(cfg)
        params = Transformer(cfg).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
        params = gen.decode_params(params)
        gen.generate(params, prompts, sampling, jax.random.key(0))  # compile
        runs[name] = (cfg, gen, params, [])
    for _ in range(args.repeats):
        for name, (cfg, gen, params, steps) in runs.items():
            gen.generate(params, prompts, sampling, jax.random.key(0))
            steps.append(statistics.median(gen.last_timings["step_s"]))
    base = statistics.median(runs["gqa_mha"][3])
    for name, (cfg, gen, params, steps) in runs.items():
        step = statistics.median(steps)
        print(json.dumps({
            "name": name,
            "kv_cache_bytes_per_token": cache_bytes_per_token(gen, args.batch, args.prompt + args.new_tokens),
            "decode_step_s": step,
            "step_times_s": [round(s, 5) for s in steps],
            "tokens_per_s": args.batch / step,
            "step_ratio_to_gqa_mha": step / base,
            "params": sum(x.size for x in jax.tree.leaves(params)),
            "attention_layer": cfg.attention_layer,
            "num_kv_heads": cfg.kv_heads,
            "mla": dataclasses.asdict(cfg.mla) if cfg.attention_layer == "mla" else None,
            "batch": args.batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
            "machine": machine_info(),
        }), flush=True)


if __name__ == "__main__":
    main()
