"""Plot several runs' training and validation curves (against steps and tokens) into one PNG.

    python -m jaxllm.plot runs/tiny_lm runs/moe_tiny --out moe_vs_dense.png \
        [--label dense --label moe] [--eval_metric eval_bits_per_byte] [--title "..."]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from jaxllm import plots
from jaxllm.config import ConfigError


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plot jaxllm runs' loss curves.")
    parser.add_argument("workdirs", nargs="+", help="run directories (each with a metrics.jsonl)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--label", action="append", help="one per run; default the directory names")
    parser.add_argument("--train_metric", default="loss")
    parser.add_argument("--eval_metric", default="eval_loss", help="e.g. eval_bits_per_byte, eval_accuracy")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    try:
        summary = plots.plot_runs(args.workdirs, args.out, args.label, args.train_metric, args.eval_metric, args.title)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({"out": args.out, "points": summary}))


if __name__ == "__main__":
    main()
