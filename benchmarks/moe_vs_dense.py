"""MoE vs dense at equal active parameters and equal training tokens on the default corpus: trains
tiny_lm (dense, at its comparison length of 300 steps) and moe_tiny (8 experts of half the width,
top-2, dropless) with the same data, steps, batch and optimizer, and prints one JSON object per
model with its validation loss.

    python benchmarks/moe_vs_dense.py [--root runs/moe_vs_dense] [--set train.steps=300 ...]

Each model trains in `<root>/<name>`; running the command again resumes (or, if finished, only
reads back the result). Validation uses the same held-out batches for both. Switch Transformer
reports that the MoE wins at equal compute per token; this prints what happens here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import moe_tiny  # noqa: E402
import tiny_lm  # noqa: E402
from train_throughput import machine_info  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm.training import flops, metrics_file, train  # noqa: E402
from jaxllm.models import count_params  # noqa: E402


def last_record_with(path: str, key: str) -> dict:
    return next((r for r in reversed(metrics_file.read_records(path)) if key in r), {})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/moe_vs_dense")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides applied to both models, e.g. train.steps=300")
    args = parser.parse_args(argv)
    for name, get_config in (("dense", tiny_lm.comparison_config), ("moe", moe_tiny.get_config)):
        workdir = os.path.join(args.root, name)
        cfg = config_lib.override(get_config(), [
            f"workdir={workdir}", "train.progress_bar=false", *args.set])
        start = time.perf_counter()
        state = train.train(cfg)
        wall = time.perf_counter() - start
        final = last_record_with(os.path.join(workdir, "metrics.jsonl"), "eval_loss")
        print(json.dumps({
            "name": name,
            "steps": cfg.train.steps,
            "tokens": cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len,
            "params": count_params(state.params),
            "active_matmul_params": flops.matmul_params(cfg.model),
            "eval_loss": final.get("eval_loss"),
            "eval_bits_per_byte": final.get("eval_bits_per_byte"),
            "train_loss": final.get("loss"),
            "median_logged_step_time_s": final.get("step_time_s"),
            "moe_aux_loss": final.get("moe/aux_loss"),
            "wall_s_this_invocation": wall,
            "workdir": workdir,
            "machine": machine_info(),
        }), flush=True)


if __name__ == "__main__":
    main()
