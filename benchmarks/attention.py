"""The attention core alone: forward and backward of `layers.dot_product_attention` (scores, masked
softmax, weighted sum and their gradients, no projections) for one layer of a training
configuration, at several causal query-block counts. One JSON object per line.

    python benchmarks/attention.py [--config d512] [--blocks 1,2,4,8] [--rounds 15]

Inputs are random q/k/v shaped like the configuration's (batch, seq_len, heads, head size) and rows
packed with two documents, as in the training data. Every block count is compiled first; then each
round times one call of every variant in turn, and the median is reported. `gflops_per_s` counts the
matmul FLOPs the variant actually runs (the blocks skip keys in the future), so it says how close
the core gets to the machine's matmul peak (see train_throughput.py's `peak_flops`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from train_throughput import CONFIGS, machine_info  # noqa: E402

from jaxllm import layers  # noqa: E402


def attention_inputs(cfg, seed: int = 0):
    m, B, L = cfg.model, cfg.train.batch_size, cfg.train.seq_len
    G, K = m.num_heads // m.kv_heads, m.head_size
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((B, L, m.kv_heads, G, K), (B, L, m.kv_heads, K), (B, L, m.kv_heads, K)))
    segment_ids = np.ones((B, L), np.int32)
    segment_ids[:, L // 2:] = 2
    index = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    mask = layers.attention_mask(jnp.asarray(segment_ids), jnp.asarray(segment_ids), index, index)
    return (q, k, v), layers.attention_bias(mask)


def blocked_attention_step(blocks: int, bias, has_keys):
    """Jitted forward + backward of the attention core with `blocks` causal query blocks."""

    def loss(q, k, v):
        out = layers.dot_product_attention(q, k, v, bias, has_keys, causal_self=True, blocks=blocks)
        return jnp.sum(out * out)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def matmul_flops(q_shape, blocks: int) -> int:
    """Forward (2 matmuls) + backward (4) FLOPs over the score entries the blocks compute."""
    B, L, N, G, K = q_shape
    size = L // blocks
    scored = sum(size * (i + 1) * size for i in range(blocks))  # query x key entries per head
    return 6 * 2 * B * N * G * scored * K


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="d512", choices=sorted(CONFIGS))
    parser.add_argument("--blocks", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)

    cfg = CONFIGS[args.config]()
    (q, k, v), (bias, has_keys) = attention_inputs(cfg)
    variants = {}
    for blocks in map(int, args.blocks.split(",")):
        step = blocked_attention_step(blocks, bias, has_keys)
        jax.block_until_ready(step(q, k, v))
        variants[blocks] = (step, [])
    for _ in range(args.rounds):
        for step, times in variants.values():
            start = time.perf_counter()
            jax.block_until_ready(step(q, k, v))
            times.append(time.perf_counter() - start)
    command = "python benchmarks/attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for blocks, (_, times) in variants.items():
        median = statistics.median(times)
        flops = matmul_flops(q.shape, blocks)
        print(json.dumps({
            "config": args.config, "causal_query_blocks": blocks, "shape_BLNGK": list(q.shape),
            "fwd_bwd_median_s": median, "per_step_all_layers_s": median * cfg.model.num_layers,
            "matmul_flops": flops, "gflops_per_s": flops / median / 1e9,
            "default_blocks": layers.CAUSAL_QUERY_BLOCKS, "rounds": args.rounds,
            "command": command.strip(),
        }))
    print(json.dumps({"metric": "machine", **machine_info()}))


if __name__ == "__main__":
    main()
