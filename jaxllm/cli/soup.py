"""Average the weights of runs into a new run directory: the uniform soup of several runs of one
architecture, their greedy soup (`--greedy`, ingredients kept only if they improve the held-out
score), or one run's last K checkpoints (`--last K`). Prints the soup's record as JSON.

    python -m jaxllm.soup --workdir runs/a --workdir runs/b --out runs/soup [--greedy --held_out_batches 4 --held_out_stride 2]
    python -m jaxllm.soup --workdir runs/a --out runs/a_last3 --last 3
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from jaxllm.combine import ensemble, soup
from jaxllm.config import ConfigError


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Average the weights of jaxllm runs (model soups).")
    parser.add_argument("--workdir", action="append", required=True, help="repeat: one per ingredient")
    parser.add_argument("--out", required=True, help="new run directory for the soup")
    parser.add_argument("--greedy", action="store_true", help="greedy soup on held-out validation batches")
    parser.add_argument("--held_out_batches", type=int, default=4,
                        help="how many validation batches rank the greedy soup's ingredients")
    parser.add_argument("--held_out_first", type=int, default=0, help="the first of them")
    parser.add_argument("--held_out_stride", type=int, default=1,
                        help="every stride-th batch (2: the even batches; report on the odd ones)")
    parser.add_argument("--last", type=int, default=0, help="average the last K checkpoints of one --workdir")
    args = parser.parse_args(argv)
    if args.last and (len(args.workdir) != 1 or args.greedy):
        parser.error("--last averages the checkpoints of one --workdir (and is not --greedy)")
    try:
        if args.last:
            record = soup.average_last(args.workdir[0], args.out, args.last)
        else:
            held_out = ensemble.batch_indices(args.held_out_batches, args.held_out_first, args.held_out_stride)
            record = soup.make_soup(args.workdir, args.out, args.greedy, held_out)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
