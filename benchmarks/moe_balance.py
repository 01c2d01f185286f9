"""Aux-loss-free vs auxiliary-loss load balancing (DeepSeek-V3 style MoE, experiments/
moe_deepseek_tiny.py): trains the bias-balanced model, the aux-loss-balanced one and an unbalanced
one on the same batches and prints one JSON object per model: the load imbalance over training
(busiest expert's share of the token copies over the mean share, worst MoE layer, at every logged
step: its mean over the run and its last value) and the validation loss at equal steps.

    python benchmarks/moe_balance.py [--root runs/moe_balance] [--set train.steps=150 ...]

Each model trains in `<root>/<name>`; running again resumes (or only reads back a finished run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import moe_deepseek_tiny  # noqa: E402
from train_throughput import machine_info  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm.training import metrics_file, train  # noqa: E402

MODELS = {
    "aux_loss_free": moe_deepseek_tiny.get_config,
    "aux_loss": moe_deepseek_tiny.aux_loss_config,
    "unbalanced": moe_deepseek_tiny.unbalanced_config,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/moe_balance")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides applied to every model, e.g. train.steps=150")
    args = parser.parse_args(argv)
    for name in args.models.split(","):
        workdir = os.path.join(args.root, name)
        cfg = config_lib.override(MODELS[name](), [
            f"workdir={workdir}", "train.progress_bar=false", "train.log_every=10", *args.set])
        start = time.perf_counter()
        train.train(cfg)
        wall = time.perf_counter() - start
        records = metrics_file.read_records(os.path.join(workdir, "metrics.jsonl"))
        E = cfg.model.moe.num_experts
        imbalance = [max(r["moe/expert_fraction_max"]) * E for r in records if "moe/expert_fraction_max" in r]
        final = next((r for r in reversed(records) if "eval_loss" in r), {})
        print(json.dumps({
            "name": name,
            "steps": cfg.train.steps,
            "eval_loss": final.get("eval_loss"),
            "eval_bits_per_byte": final.get("eval_bits_per_byte"),
            "train_loss": final.get("loss"),
            "max_over_mean_load_mean": statistics.mean(imbalance) if imbalance else None,
            "max_over_mean_load_last": imbalance[-1] if imbalance else None,
            "max_over_mean_load_by_log_step": [round(x, 3) for x in imbalance],
            "median_logged_step_time_s": statistics.median(r["step_time_s"] for r in records if "step_time_s" in r),
            "wall_s_this_invocation": wall,
            "workdir": workdir,
            "machine": machine_info(),
        }), flush=True)


if __name__ == "__main__":
    main()
