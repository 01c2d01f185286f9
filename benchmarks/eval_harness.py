"""The embedded lm-eval tasks' scores and the harness model's throughput, per run directory; prints
one JSON object.

    nice -n 10 python benchmarks/eval_harness.py --workdir runs/tiny_lm --workdir runs/tiny_lm_int8 \
        [--tasks jaxllm_stdlib] [--limit N] [--batch_size 16]

Per run: every task's metrics (lm-eval's results, stderr dropped) and, per request type, the
requests served and their seconds, after a warm-up pass (--warmup examples per task) that compiles
the bucket shapes; requests/s is requests over those seconds (the model's calls only, not lm-eval's
own bookkeeping).
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from jaxllm.evaluation import harness, runner


class TimedLM(harness.JaxllmLM):
    """JaxllmLM that counts the requests of each type and the seconds spent serving them."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timings: dict = {}

    def _timed(self, kind, fn, requests, **kwargs):
        start = time.perf_counter()
        out = fn(requests, **kwargs)
        entry = self.timings.setdefault(kind, {"requests": 0, "seconds": 0.0})
        entry["requests"] += len(requests)
        entry["seconds"] += time.perf_counter() - start
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._timed("loglikelihood", super().loglikelihood, requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._timed("loglikelihood_rolling", super().loglikelihood_rolling, requests, disable_tqdm=True)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._timed("generate_until", super().generate_until, requests, disable_tqdm=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", action="append", required=True)
    parser.add_argument("--tasks", default=runner.EMBEDDED_TAG)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    names = args.tasks.split(",")
    manager = runner.task_manager(names)
    report = {"device": str(jax.devices()[0].device_kind), "batch_size": args.batch_size, "runs": {}}
    for workdir in args.workdir:
        lm = TimedLM(workdir, batch_size=args.batch_size)
        runner.evaluate(lm, names, manager, limit=args.warmup, bootstrap_iters=0)
        lm.timings = {}
        start = time.perf_counter()
        results = runner.evaluate(lm, names, manager, limit=args.limit, bootstrap_iters=0)
        wall = time.perf_counter() - start
        scores = {task: {k.split(",")[0]: v for k, v in metrics.items()
                         if "stderr" not in k and k != "alias" and isinstance(v, (int, float))}
                  for task, metrics in results["results"].items()}
        throughput = {kind: {**t, "requests_per_s": t["requests"] / t["seconds"]} for kind, t in lm.timings.items()}
        report["runs"][workdir] = {"scores": scores, "throughput": throughput, "wall_s": wall,
                                   "n_samples": {k: v["effective"] for k, v in results["n-samples"].items()}}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
