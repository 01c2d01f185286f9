"""LoRA against full fine-tuning of the d512 backbone (benchmarks/train_throughput.py's d512 config,
a causal LM): the median train-step time and the optimizer-state bytes of each, measured side by
side in one run (steps alternate between the two). One JSON object.

    python benchmarks/finetune.py [--rounds 8] [--rank 8] [--merged] [--dropout 0.1]

LoRA here is rank `--rank` on attention q, k, v, o with the base frozen (training/finetune.py):
the optimizer state covers only the adapters. The train step applies the adapters unmerged
(x W + s·(x A) B); `--merged` also times the same LoRA step with the adapters merged into the
kernels (W + s·A·B) each step, as training did before, and `--dropout P` LoRA with adapter dropout
P, all in the same alternation. Targets: LoRA step <= 0.8x full, optimizer state <= 0.05x full.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, os.path.join(REPO, "experiments"))

from train_throughput import CONFIGS, machine_info, synthetic_batch  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import sharding  # noqa: E402
from jaxllm.training import train  # noqa: E402


def state_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--merged", action="store_true", help="also time LoRA with the adapters merged each step")
    parser.add_argument("--dropout", type=float, default=0.0, help="> 0: also time LoRA with this adapter dropout")
    args = parser.parse_args()
    full_cfg = CONFIGS["d512"]()
    full_cfg = dataclasses.replace(full_cfg, mesh=config_lib.MeshConfig(data=1, fsdp=-1, tensor=1, expert=1))
    lora_cfg = dataclasses.replace(full_cfg, init_from="(random base)", finetune=config_lib.FinetuneConfig(
        mode="lora", lora=config_lib.LoraConfig(rank=args.rank)))
    full = train.setup(full_cfg)
    lora = train.setup(lora_cfg, full.mesh)
    full_state = train.init_state(full, jax.random.key(0))
    # The frozen base: a model's params (random: timing does not depend on their values).
    frozen = jax.tree.map(lambda x: x.copy(), full_state.params)
    lora_state = train.init_state(lora, jax.random.key(1))
    steps = {"full": train.make_train_step(full), "lora": train.make_train_step(lora, frozen=frozen)}
    states = {"full": full_state, "lora": lora_state}
    if args.merged:  # the same step with the adapters merged into the frozen kernels (Plan.compose)
        model_loss = lora.family.loss_fn(lora.model, lora_cfg)
        steps["lora_merged"] = train.make_train_step(
            lora, frozen=frozen,
            loss_fn=lambda params, batch, frozen: model_loss(
                lora.plan.compose(params, jax.lax.stop_gradient(frozen)), batch))
        states["lora_merged"] = train.init_state(lora, jax.random.key(1))
    if args.dropout > 0:
        drop_cfg = dataclasses.replace(lora_cfg, finetune=dataclasses.replace(
            lora_cfg.finetune, lora=dataclasses.replace(lora_cfg.finetune.lora, dropout=args.dropout)))
        drop = train.setup(drop_cfg, full.mesh)
        steps["lora_dropout"] = train.make_train_step(drop, frozen=frozen)
        states["lora_dropout"] = train.init_state(drop, jax.random.key(1))
    rng = np.random.default_rng(0)
    batch = sharding.place_batch(synthetic_batch(rng, full_cfg.train.batch_size, full_cfg.train.seq_len), full.mesh)
    times = {name: [] for name in steps}
    compile_s = {}
    for name in steps:
        start = time.perf_counter()
        states[name], metrics = steps[name](states[name], batch)
        jax.block_until_ready(metrics)
        compile_s[name] = time.perf_counter() - start
    for k in range(args.warmup + args.rounds):
        for name in steps:
            start = time.perf_counter()
            states[name], metrics = steps[name](states[name], batch)
            jax.block_until_ready(metrics)
            if k >= args.warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    opt_bytes = {name: state_bytes(states[name].opt_state) for name in states}
    print(json.dumps({
        "config": "d512", "rank": args.rank, "batch_size": full_cfg.train.batch_size, "seq_len": full_cfg.train.seq_len,
        "full_step_s": median["full"], "lora_step_s": median["lora"], "lora_over_full_step": median["lora"] / median["full"],
        "full_opt_state_bytes": opt_bytes["full"], "lora_opt_state_bytes": opt_bytes["lora"],
        "lora_over_full_opt_state": opt_bytes["lora"] / opt_bytes["full"],
        "trainable_params": {name: int(sum(x.size for x in jax.tree.leaves(states[name].params))) for name in states},
        **{f"{name}_step_s": median[name] for name in steps if name not in ("full", "lora")},
        **{f"{name}_over_full_step": median[name] / median["full"] for name in steps if name not in ("full", "lora")},
        "lora_dropout": args.dropout,
        "min_step_s": {name: min(t) for name, t in times.items()},  # less sensitive to a shared machine's load
        "compile_s": compile_s, "step_times_s": times, "machine": machine_info(),
    }))


if __name__ == "__main__":
    main()
