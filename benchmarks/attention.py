"""The attention core alone: forward and backward of `jaxllm.ops.attention.dot_product_attention` (scores, masked
softmax, weighted sum and their gradients, no projections) for one layer of a training
configuration, at several causal query-block counts, and on a GPU cuDNN's fused attention
(`jaxllm.ops.attention.fused_attention`, model.attention_impl=cudnn). One JSON object per line.

    python benchmarks/attention.py [--config d512] [--blocks 1,2,4,8] [--rounds 15]
                                   [--dtype float32] [--cudnn]

Inputs are random q/k/v shaped like the configuration's (batch, seq_len, heads, head size) and rows
packed with two documents, as in the training data. Every block count is compiled first; then each
round times one call of every variant in turn, and the median is reported. `gflops_per_s` counts the
matmul FLOPs the variant actually runs (the blocks skip keys in the future), so it says how close
the core gets to the machine's matmul peak (see train_throughput.py's `peak_flops`). With --cudnn
(bfloat16 or float16 only), `max_rel_diff_vs_xla` compares its output and gradients with the XLA
path's at the default block count.
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

from jaxllm.layers import attention as attention_layers  # noqa: E402
from jaxllm.ops import attention as attention_ops  # noqa: E402


def attention_inputs(cfg, seed: int = 0, dtype=jnp.float32):
    m, B, L = cfg.model, cfg.train.batch_size, cfg.train.seq_len
    G, K = m.num_heads // m.kv_heads, m.head_size
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), dtype)
               for shape in ((B, L, m.kv_heads, G, K), (B, L, m.kv_heads, K), (B, L, m.kv_heads, K)))
    segment_ids = np.ones((B, L), np.int32)
    segment_ids[:, L // 2:] = 2
    index = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    mask = attention_layers.attention_mask(jnp.asarray(segment_ids), jnp.asarray(segment_ids), index, index)
    return (q, k, v), attention_ops.attention_bias(mask)


def attention_step(attend):
    """Jitted forward + backward of `attend(q, k, v)`: returns the output and the gradients of
    sum(out²), so variants can be compared."""

    def loss(q, k, v):
        out = attend(q, k, v)
        return jnp.sum(jnp.square(out.astype(jnp.float32))), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def blocked_attention_step(blocks: int, bias, has_keys):
    """The XLA path with `blocks` causal query blocks."""
    return attention_step(lambda q, k, v: attention_ops.dot_product_attention(
        q, k, v, bias, has_keys, causal_self=True, blocks=blocks))


def max_rel_diff(a_tree, b_tree) -> float:
    """Largest ‖a − b‖ / ‖b‖ over the leaves, in float32."""
    diffs = []
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        diffs.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
    return max(diffs)


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
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--cudnn", action="store_true", help="also time cuDNN's fused attention (GPU)")
    args = parser.parse_args(argv)
    if args.cudnn and args.dtype == "float32":
        parser.error("--cudnn needs --dtype bfloat16 or float16 (cuDNN has no float32 attention)")

    cfg = CONFIGS[args.config]()
    (q, k, v), (bias, has_keys) = attention_inputs(cfg, dtype=jnp.dtype(args.dtype))
    variants = {}
    for blocks in map(int, args.blocks.split(",")):
        variants[("xla", blocks)] = blocked_attention_step(blocks, bias, has_keys)
    if args.cudnn:
        variants[("cudnn", 1)] = attention_step(
            lambda q, k, v: attention_ops.fused_attention(q, k, v, bias, has_keys))
    results = {name: jax.block_until_ready(step(q, k, v)) for name, step in variants.items()}
    reference = results.get(("xla", attention_ops.CAUSAL_QUERY_BLOCKS))
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(step(q, k, v))
            times[name].append(time.perf_counter() - start)
    command = "python benchmarks/attention.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for (impl, blocks), step_times in times.items():
        median = statistics.median(step_times)
        # cuDNN skips the tiles above the diagonal: count the causal half exactly (L one-row blocks).
        flops = matmul_flops(q.shape, blocks if impl == "xla" else q.shape[1])
        (_, out), grads = results[(impl, blocks)]
        line = {
            "config": args.config, "impl": impl, "causal_query_blocks": blocks,
            "shape_BLNGK": list(q.shape), "dtype": args.dtype,
            "fwd_bwd_median_s": median, "per_step_all_layers_s": median * cfg.model.num_layers,
            "matmul_flops": flops, "gflops_per_s": flops / median / 1e9,
            "default_blocks": attention_ops.CAUSAL_QUERY_BLOCKS, "rounds": args.rounds,
            "command": command.strip(),
        }
        if reference is not None and args.cudnn:
            line["max_rel_diff_vs_xla"] = max_rel_diff((out, grads), (reference[0][1], reference[1]))
        print(json.dumps(line))
    print(json.dumps({"metric": "machine", **machine_info()}))


if __name__ == "__main__":
    main()
