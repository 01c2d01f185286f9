"""How planning grows with the pod: wall time, CPU time and peak host memory of
`python -m jaxllm.plan` for one experiment at several chip counts, one row per chip (the global
batch grows with the pod, so each chip's program is the same size). One JSON object per line.

    python benchmarks/plan_scaling.py [--experiment experiments/llama3_8b.py] \
        [--topologies v5p-32,v5p-128,v5p-256,v5p-512,v5p-1024] [--costs] [--set key=value ...]

Each plan runs in a fresh process (libtpu and the compiled program are freed between them);
peak memory is that process's maximum resident set. Without --costs only the full train step is
compiled (the two small per-layer compiles of the cost correction do not grow with the pod).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from jaxllm.planning import topology


def plan_once(experiment: str, topo: str, overrides: list[str], costs: bool) -> dict:
    chips = topology.parse(topo).chips
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        cmd = [sys.executable, "-m", "jaxllm.plan", experiment, f"train.batch_size={chips}", *overrides,
               "--topology", topo, "--json", out] + ([] if costs else ["--no_costs"])
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode not in (0, 1):  # 1: planned, does not fit
            raise SystemExit(f"plan for {topo} failed:\n{done.stderr[-2000:]}")
        report = json.load(open(out))
    return {
        "topology": topo, "chips": chips, "wall_s": round(wall, 1),
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
        # ru_maxrss of children is the largest any child reached; plans run largest-last, so each
        # row's figure is its own as long as memory grows with the pod.
        "peak_rss_gib": round(after.ru_maxrss / 2**20, 2),
        "compile_s": round(report["compile_s"], 1), "fits": report["fits"],
        "per_device_gib": round(report["memory_gib"]["total"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/llama3_8b.py")
    parser.add_argument("--topologies", default="v5p-32,v5p-128,v5p-256,v5p-512,v5p-1024")
    parser.add_argument("--costs", action="store_true", help="also the per-layer cost compiles")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value")
    args = parser.parse_args()
    for topo in args.topologies.split(","):
        row = plan_once(args.experiment, topo, args.set, args.costs)
        print(json.dumps({"experiment": args.experiment, "overrides": args.set, **row}), flush=True)


if __name__ == "__main__":
    main()
