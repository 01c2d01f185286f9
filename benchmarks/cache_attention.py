"""The position-dependent part of a cached decode step: attention of one new token over the KV cache
of every layer, at two cache lengths, against a plain read of the same bytes. One JSON object per
line.

    python benchmarks/cache_attention.py [--config tiny] [--batch 8] [--lengths 192,640]
                                         [--rounds 7]

For each cache length S (prompt + new tokens: 64 + 128 and 512 + 128 by default) and the config's
layers, KV heads and head size, it times:
- `float32`: `attention_ops.cached_attention`, what generation runs (the cache laid out [batch·kv_heads, S,
  head_size]);
- `bfloat16` / `int8`: the same attention over a cache stored in half or a quarter of the bytes
  (bfloat16 matmuls accumulating in float32; int8 with a float32 scale per slot, converted to
  float32 for the matmuls), what a smaller cache would cost on this backend;
- `read_only`: a sum over every float32 cache array, the rate at which XLA streams those bytes.
`gb_per_s` is the float32-equivalent cache bytes (keys and values of every layer) over the time;
`us_per_slot` is the time per cache slot. All variants are compiled first; each round times every
variant (`--calls` calls each), medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import CONFIGS, machine_info  # noqa: E402

from jaxllm.layers import attention as attention_layers  # noqa: E402
from jaxllm.ops import attention as attention_ops  # noqa: E402


def low_precision_attention(q_BLNGK, k_XSK, v_XSK, bias_B11LS, has_keys_B11L1, k_scale_XS=None,
                            v_scale_XS=None):
    """`attention_ops.cached_attention` with keys and values in a narrower dtype: bfloat16 operands
    accumulate in float32; int8 ones carry a float32 scale per slot and are converted first."""
    B, L, N, G, K = q_BLNGK.shape
    S = k_XSK.shape[1]
    q_XMK = jnp.transpose(q_BLNGK / math.sqrt(K), (0, 2, 3, 1, 4)).reshape(B * N, G * L, K)
    if k_scale_XS is not None:
        scores = jnp.einsum("xmk,xsk->xms", q_XMK, k_XSK.astype(jnp.float32)) * k_scale_XS[:, None]
    else:
        scores = jnp.einsum("xmk,xsk->xms", q_XMK.astype(k_XSK.dtype), k_XSK,
                            preferred_element_type=jnp.float32)
    probs = attention_ops._masked_softmax(scores.reshape(B, N, G, L, S), bias_B11LS, has_keys_B11L1)
    probs = probs.reshape(B * N, G * L, S)
    if v_scale_XS is not None:
        out = jnp.einsum("xms,xsk->xmk", probs * v_scale_XS[:, None], v_XSK.astype(jnp.float32))
    else:
        out = jnp.einsum("xms,xsk->xmk", probs.astype(v_XSK.dtype), v_XSK,
                         preferred_element_type=jnp.float32)
    return jnp.transpose(out.reshape(B, N, G, L, K), (0, 3, 1, 2, 4))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lengths", default="192,640")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args(argv)
    m = CONFIGS[args.config]().model
    B, N, G, K, layer_count = args.batch, m.kv_heads, m.num_heads // m.kv_heads, m.head_size, m.num_layers
    rng = np.random.default_rng(0)

    for S in (int(s) for s in args.lengths.split(",")):
        q = jnp.asarray(rng.standard_normal((B, 1, N, G, K)), jnp.float32)
        # The new token sits at the last slot and sees the whole cache.
        segments = jnp.ones((B, S), jnp.int32)
        mask = attention_layers.attention_mask(segments[:, -1:], segments, jnp.full((B, 1), S - 1),
                                     jnp.broadcast_to(jnp.arange(S), (B, S)))
        bias, has_keys = attention_ops.attention_bias(mask)
        caches = [jnp.asarray(rng.standard_normal((B * N, S, K)), jnp.float32)
                  for _ in range(2 * layer_count)]
        int8_caches = [jnp.asarray(rng.integers(-127, 128, (B * N, S, K)), jnp.int8) for _ in caches]
        scales = [jnp.full((B * N, S), 0.02, jnp.float32) for _ in caches]
        inputs = {
            "float32": caches,
            "bfloat16": [c.astype(jnp.bfloat16) for c in caches],
            "int8": (int8_caches, scales),
            "read_only": caches,
        }

        def every_layer(attend):
            def step(q, cache):
                outs = [attend(q, *cache[2 * i: 2 * i + 2]) for i in range(layer_count)]
                return sum(outs)
            return jax.jit(step)

        functions = {
            "float32": every_layer(lambda q, k, v: attention_ops.cached_attention(q, k, v, bias, has_keys)),
            "bfloat16": every_layer(lambda q, k, v: low_precision_attention(q, k, v, bias, has_keys)),
            "int8": jax.jit(lambda q, c: sum(
                low_precision_attention(q, c[0][2 * i], c[0][2 * i + 1], bias, has_keys,
                                        c[1][2 * i], c[1][2 * i + 1])
                for i in range(layer_count))),
            "read_only": jax.jit(lambda q, cache: sum(jnp.sum(c) for c in cache)),
        }
        for name, fn in functions.items():
            jax.block_until_ready(fn(q, inputs[name]))
        times = {name: [] for name in functions}
        for _ in range(args.rounds):
            for name, fn in functions.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    out = fn(q, inputs[name])
                jax.block_until_ready(out)
                times[name].append((time.perf_counter() - start) / args.calls)
        float32_bytes = sum(c.nbytes for c in caches)
        for name in functions:
            seconds = statistics.median(times[name])
            print(json.dumps({
                "config": args.config, "batch": B, "cache_slots": S, "variant": name,
                "ms": seconds * 1e3, "float32_cache_bytes": float32_bytes,
                "gb_per_s": float32_bytes / seconds / 1e9, "us_per_slot": seconds / S * 1e6,
                "machine": machine_info(),
            }), flush=True)


if __name__ == "__main__":
    main()
