"""What a mixture-of-experts MLP costs: the train-step time of an MoE model (E=8, top-2) divided by
that of the dense model with the same active parameters per token, measured in one run. One JSON
object per line.

    python benchmarks/moe_cost.py [--rounds 8] [--base tiny] [--deepseek] [--set key=value ...]

The dense reference is the base configuration (tiny_lm: d256, 4 layers, MLP 704, 16 x 256 tokens).
Every MoE variant replaces each block's MLP by 8 experts of width 704 / 2 = 352 with top-2 routing,
so two experts per token do the dense MLP's work. Variants:

- `capacity_1.25`: capacity dispatch, capacity factor 1.25 (per-sequence groups);
- `dropless_blocked`: dropless, sorted rows padded to per-expert blocks (the CPU default);
- `dropless_ragged_dot`: dropless with jax.lax.ragged_dot (the GPU/TPU default);
- `naive_every_expert`: every expert on every token copy, then the routed result kept.

With `--deepseek` the variants are DeepSeek-style instead (64 fine-grained experts, 6 routed + 2
shared per token, each of width 704 / 8 = 88, so again the dense MLP's active parameters):

- `deepseek_softmax`: softmax top-6 router, dropless blocked;
- `deepseek_sigmoid_bias`: DeepSeek-V3's sigmoid router with the aux-loss-free bias (updated every
  step), routed scale 2.5;
- `deepseek_sigmoid_bias_groups`: the same with group-limited top-k (8 groups, 4 chosen).

All variants are compiled first; then each round runs one step of every configuration in turn and
the median over rounds is reported, so a burst of load from other processes hits them all alike.
`ratio_to_dense` = median MoE step time / median dense step time (the ideal is 1.0).
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
sys.path.insert(0, os.path.join(REPO, "experiments"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from train_throughput import CONFIGS, machine_info, synthetic_batch  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import sharding  # noqa: E402
from jaxllm.training import flops, train  # noqa: E402

VARIANTS = {
    "capacity_1.25": dict(dispatch="capacity", capacity_factor=1.25),
    "dropless_blocked": dict(dispatch="dropless", grouped_matmul="blocked"),
    "dropless_ragged_dot": dict(dispatch="dropless", grouped_matmul="ragged_dot"),
    "naive_every_expert": dict(dispatch="dropless", grouped_matmul="dense"),
}


DEEPSEEK_VARIANTS = {
    "deepseek_softmax": dict(grouped_matmul="blocked"),
    "deepseek_sigmoid_bias": dict(grouped_matmul="blocked", router="sigmoid", router_bias=True,
                                  bias_update_rate=1e-3, routed_scale=2.5, aux_loss_weight=0.0),
    "deepseek_sigmoid_bias_groups": dict(grouped_matmul="blocked", router="sigmoid", router_bias=True,
                                         bias_update_rate=1e-3, routed_scale=2.5, aux_loss_weight=0.0,
                                         num_groups=8, topk_groups=4),
}


def deepseek_variant(dense: config_lib.Config, num_experts: int = 64, top_k: int = 6, num_shared: int = 2,
                     **moe) -> config_lib.Config:
    """Fine-grained routed experts plus shared ones, all of width mlp_dim / (top_k + num_shared):
    the dense model's active MLP parameters per token."""
    width = dense.model.mlp_dim // (top_k + num_shared)
    return dataclasses.replace(dense, model=dataclasses.replace(
        dense.model, moe=config_lib.MoeConfig(num_experts=num_experts, top_k=top_k, expert_dim=width,
                                              num_shared=num_shared, shared_dim=width, dispatch="dropless",
                                              **moe)))


def moe_variant(dense: config_lib.Config, num_experts: int, top_k: int, **moe) -> config_lib.Config:
    expert_dim = dense.model.mlp_dim // top_k
    return dataclasses.replace(dense, model=dataclasses.replace(
        dense.model, moe=config_lib.MoeConfig(num_experts=num_experts, top_k=top_k,
                                              expert_dim=expert_dim, **moe)))


class Stepper:
    """One configuration's compiled train step, state and batches on all local devices."""

    def __init__(self, cfg: config_lib.Config):
        self.mesh = sharding.make_mesh(cfg.mesh, jax.local_devices())
        s = train.setup(cfg, self.mesh)
        self.state = train.init_state(s, jax.random.key(cfg.seed))
        rng = np.random.default_rng(0)
        self.batches = [sharding.place_batch(
            synthetic_batch(rng, cfg.train.batch_size, cfg.train.seq_len), self.mesh) for _ in range(2)]
        start = time.perf_counter()
        with sharding.activate(self.mesh):
            self.compiled = train.make_train_step(s).jitted.lower(self.state, self.batches[0]).compile()
        self.compile_s = time.perf_counter() - start
        self.params = sum(x.size for x in jax.tree.leaves(self.state.params))
        self.calls = 0
        self.metrics = None

    def step(self) -> float:
        start = time.perf_counter()
        with sharding.activate(self.mesh):
            self.state, self.metrics = self.compiled(self.state, self.batches[self.calls % 2])
        jax.block_until_ready(self.metrics)
        self.calls += 1
        return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--variants", default=None, help="default: every variant of the chosen set")
    parser.add_argument("--deepseek", action="store_true",
                        help="DeepSeek-style variants: 64 fine-grained experts, 6 routed + 2 shared")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every configuration")
    args = parser.parse_args(argv)

    dense = config_lib.override(CONFIGS[args.base](), args.set)
    dense = dataclasses.replace(dense, mesh=config_lib.MeshConfig(data=1, fsdp=-1, tensor=1, expert=1))
    cfgs = {"dense": dense}
    table = DEEPSEEK_VARIANTS if args.deepseek else VARIANTS
    for name in (args.variants or ",".join(table)).split(","):
        cfgs[name] = (deepseek_variant(dense, **table[name]) if args.deepseek
                      else moe_variant(dense, args.num_experts, args.top_k, **table[name]))
    steppers = {name: Stepper(cfg) for name, cfg in cfgs.items()}
    for _ in range(args.warmup):
        for stepper in steppers.values():
            stepper.step()
    times = {name: [] for name in steppers}
    for _ in range(args.rounds):
        for name, stepper in steppers.items():
            times[name].append(stepper.step())

    dense_time = statistics.median(times["dense"])
    for name, stepper in steppers.items():
        cfg = cfgs[name]
        median = statistics.median(times[name])
        tokens = cfg.train.batch_size * cfg.train.seq_len
        record = {
            "name": name,
            "ratio_to_dense": median / dense_time,
            "step_time_s": median,
            "step_times_s": [round(t, 4) for t in times[name]],
            "tokens_per_s": tokens / median,
            "compile_s": stepper.compile_s,
            "params": stepper.params,
            "active_matmul_params": flops.matmul_params(cfg.model),
            "moe": dataclasses.asdict(cfg.model.moe) if name != "dense" else None,
            "dropped_fraction": (float(np.mean(stepper.metrics["moe/dropped_fraction"]))
                                 if name != "dense" else None),
            # the busiest expert's share of the token copies over the mean share, worst layer
            "max_over_mean_load": (float(np.max(stepper.metrics["moe/expert_fraction_max"]))
                                   * cfg.model.moe.num_experts if name != "dense" else None),
            "base": args.base,
            "batch_size": cfg.train.batch_size,
            "seq_len": cfg.train.seq_len,
            "machine": machine_info(),
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
