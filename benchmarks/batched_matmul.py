"""How fast this machine runs attention's batched matmuls, against a plain matmul of the same
FLOPs: the ceiling on the attention core's speed under XLA. One JSON object per line.

    python benchmarks/batched_matmul.py [--config d512] [--rounds 20]

For one layer of the configuration (batch B, heads N, sequence L, head size K, float32): the
score matmul q·kᵀ ([L, K] x [K, L] for each of the B·N (batch, head) pairs) in the layout the
model uses (`blnk,bsnk->bnls`), head-major (`bnlk,bnsk->bnls`), head-major with the keys already
transposed (`bnlk,bnks->bnls`), and one [B·N·L, K] x [K, L] matmul with the same FLOPs. All are
compiled first, then each round times every variant once; medians.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import CONFIGS, machine_info  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="d512", choices=sorted(CONFIGS))
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]()
    B, L, N, K = cfg.train.batch_size, cfg.train.seq_len, cfg.model.num_heads, cfg.model.head_size
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((B, L, N, K)), jnp.float32) for _ in range(2))
    q_head, k_head = (jnp.transpose(x, (0, 2, 1, 3)) for x in (q, k))
    variants = {
        "model_layout": (lambda q, k: jnp.einsum("blnk,bsnk->bnls", q, k), (q, k)),
        "head_major": (lambda q, k: jnp.einsum("bnlk,bnsk->bnls", q, k), (q_head, k_head)),
        "head_major_keys_transposed": (lambda q, kt: jnp.einsum("bnlk,bnks->bnls", q, kt),
                                       (q_head, jnp.swapaxes(k_head, 2, 3))),
        "plain_matmul_same_flops": (lambda q, w: q.reshape(B * N * L, K) @ w, (q_head, k_head[0, 0].T)),
    }
    compiled = {name: jax.jit(fn) for name, (fn, _) in variants.items()}
    for name, fn in compiled.items():
        jax.block_until_ready(fn(*variants[name][1]))
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in compiled.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*variants[name][1]))
            times[name].append(time.perf_counter() - start)
    flops = 2 * B * N * L * L * K
    command = "python benchmarks/batched_matmul.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for name, step_times in times.items():
        median = statistics.median(step_times)
        print(json.dumps({"config": args.config, "variant": name, "shape_BNLK": [B, N, L, K],
                          "median_s": median, "gflops_per_s": flops / median / 1e9,
                          "rounds": args.rounds, "command": command.strip()}))
    print(json.dumps({"metric": "machine", **machine_info()}))


if __name__ == "__main__":
    main()
