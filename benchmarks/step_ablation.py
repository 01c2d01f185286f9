"""How much of the train step the attention core costs: the real step against the same step with
the core (scores, masked softmax, weighted sum and their gradients) replaced by a stand-in that
costs almost nothing. One JSON object per variant.

    python benchmarks/step_ablation.py [--config d512] [--rounds 12]

The stand-in returns q + k + v (broadcast over the query heads of each KV head), so the q/k/v
projections, RoPE, the output projection and their gradients all stay in the step; only the
attention core goes. Both variants are compiled first, then each round times one step of each in
turn (the first two rounds are not counted); `ratio_to_full` is the median over rounds of the
paired ratio, which cancels most of the drift on a shared machine. `mfu` counts the same model
FLOPs for both variants (jaxllm.flops), so the stand-in's MFU is the ceiling that any attention
kernel could reach on this machine with the rest of the step as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import CONFIGS, machine_info, measure_peak, peak_flops, synthetic_batch  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import sharding  # noqa: E402
from jaxllm.ops import attention as attention_ops  # noqa: E402
from jaxllm.training import flops, train  # noqa: E402


def free_attention_core(q_BLNGK, k_BSNK, v_BSNK, *unused_bias_and_flags, **unused_options):
    return q_BLNGK + (k_BSNK + v_BSNK)[:, :, :, None]


@contextlib.contextmanager
def attention_core(replacement):
    """Traces the model with `replacement` as its attention core (None: the real one)."""
    original = attention_ops.dot_product_attention
    attention_ops.dot_product_attention = replacement or original
    try:
        yield
    finally:
        attention_ops.dot_product_attention = original


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="d512", choices=sorted(CONFIGS))
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]()
    cfg = dataclasses.replace(cfg, mesh=config_lib.MeshConfig(data=1, fsdp=-1, tensor=1, expert=1))
    mesh = sharding.make_mesh(cfg.mesh, jax.local_devices())
    batch = sharding.place_batch(
        synthetic_batch(np.random.default_rng(0), cfg.train.batch_size, cfg.train.seq_len), mesh)
    rates = measure_peak([cfg]) if jax.default_backend() == "cpu" else {}

    variants = {"full": None, "attention_core_free": free_attention_core}
    compiled, states = {}, {}
    for name, replacement in variants.items():
        s = train.setup(cfg, mesh)
        states[name] = train.init_state(s, jax.random.key(cfg.seed))
        with attention_core(replacement), sharding.activate(mesh):
            compiled[name] = train.make_train_step(s).jitted.lower(states[name], batch).compile()

    times = {name: [] for name in variants}
    with sharding.activate(mesh):
        for round_index in range(args.rounds):
            for name in variants:
                start = time.perf_counter()
                states[name], metrics = compiled[name](states[name], batch)
                jax.block_until_ready(metrics)
                if round_index >= 2:
                    times[name].append(time.perf_counter() - start)

    if rates:
        for shape, rate in measure_peak([cfg]).items():
            rates[shape] = max(rate, rates.get(shape, 0.0))
    peak, source = peak_flops(cfg, rates)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    model_flops = flops.flops_per_token(cfg.model, cfg.train.seq_len) * tokens
    for name in variants:
        step_time = statistics.median(times[name])
        print(json.dumps({
            "config": args.config, "variant": name, "step_time_s": step_time,
            "step_times_s": [round(t, 4) for t in times[name]],
            "ratio_to_full": statistics.median(t / f for t, f in zip(times[name], times["full"])),
            "mfu": model_flops / step_time / peak, "peak_flops": peak, "peak_source": source,
            "machine": machine_info(),
        }), flush=True)


if __name__ == "__main__":
    main()
