"""Evaluate a run (or an ensemble of runs) with EleutherAI's lm-evaluation-harness, offline.

    python -m jaxllm.eval --workdir runs/tiny_lm --tasks jaxllm_stdlib [--limit 50] [--batch_size 16]
    python -m jaxllm.eval --workdir runs/a --workdir runs/b --tasks jaxllm_stdlib_qa   # an ensemble
    python -m jaxllm.eval --workdir runs/x --tasks hellaswag --include_path ~/lm_eval_local  # local data

The embedded tasks (jaxllm/evaluation/tasks, tag jaxllm_stdlib) read JSONL files shipped in the
package; any other task is found by name among lm-eval's own and under --include_path (YAML files,
e.g. `dataset_path: json` with local `data_files`). Hugging Face datasets and hub run offline
(HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1) unless the environment says otherwise. The results JSON
goes to W/lm_eval/results_<time>.json (or --output); the tables are printed as lm-eval prints them.
Needs the `eval` extra: pip install -e ".[eval]".
"""

from __future__ import annotations

import argparse
import datetime
import logging
import multiprocessing
import os
import sys
from typing import Sequence

from jaxllm.config import ConfigError
from jaxllm.evaluation import OPTIONAL_IMPORT_ERROR, harness, runner


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate a jaxllm run with lm-evaluation-harness.")
    parser.add_argument("--workdir", action="append", required=True,
                        help="a run directory; repeat for an ensemble of runs")
    parser.add_argument("--tasks", required=True, help="comma-separated task, group or tag names")
    parser.add_argument("--limit", type=float, default=None,
                        help="examples per task (a fraction below 1: that share of them)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--include_path", action="append", default=[],
                        help="a directory of further task YAML files; repeatable")
    parser.add_argument("--max_length", type=int, default=0,
                        help="tokens a scored row holds at most (default: the run's train.seq_len)")
    parser.add_argument("--max_gen_toks", type=int, default=harness.DEFAULT_MAX_GEN_TOKS if harness else 256)
    parser.add_argument("--tensor", type=int, default=1, help="shard heads and MLP over this many devices")
    parser.add_argument("--rule", default="mean_prob", help="an ensemble's rule: mean_prob or mean_logit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap_iters", type=int, default=1000,
                        help="bootstrap samples for the stderr of non-mean metrics (perplexities); 0 skips")
    parser.add_argument("--output", default="", help="results JSON path (default: in the first workdir)")
    parser.add_argument("--verbosity", default="ERROR", help="lm-eval's log level (its warnings: WARNING)")
    args = parser.parse_args(argv)
    logging.getLogger("lm_eval").setLevel(args.verbosity.upper())
    # lm-eval bootstraps stderrs in a process pool: fork()ing a process running JAX's threads can
    # deadlock, a fresh forkserver child cannot.
    multiprocessing.set_start_method("forkserver", force=True)
    if OPTIONAL_IMPORT_ERROR is not None:
        print(f"error: lm-eval is not installed ({OPTIONAL_IMPORT_ERROR}); pip install -e \".[eval]\"", file=sys.stderr)
        sys.exit(2)
    if args.batch_size < 1:
        parser.error(f"--batch_size {args.batch_size} must be 1 or more")
    if args.limit is not None and args.limit <= 0:
        parser.error(f"--limit {args.limit} must be positive")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        manager = runner.task_manager(names, args.include_path)
        lm = harness.JaxllmLM(args.workdir, batch_size=args.batch_size, max_length=args.max_length or None,
                              max_gen_toks=args.max_gen_toks, tensor=args.tensor, rule=args.rule,
                              seed=args.seed)
        results = runner.evaluate(lm, names, manager, limit=limit, num_fewshot=args.num_fewshot,
                                 bootstrap_iters=args.bootstrap_iters, seed=args.seed)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H-%M-%S")
    path = args.output or os.path.join(args.workdir[0], "lm_eval", f"results_{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(runner.results_json(results) + "\n")
    print(runner.summary_line(args.workdir, limit, args.num_fewshot, args.batch_size))
    print(runner.tables(results))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
