"""Where the train step's time goes on this machine: a `jax.profiler` trace of a few steps, with each
matmul's FLOPs read from the compiled program, so each matmul group gets its own FLOP/s rate. One
JSON object per line: one per matmul group (most time first), then one with the totals by fusion
kind.

    python benchmarks/step_profile.py [--config d512] [--steps 3] [--top 12]

Each executed XLA operation's time is charged to it; when several run at once (XLA:CPU runs
independent thunks concurrently), each is charged its share of the overlap, so the charges add up to
the wall time the operations cover. A matmul group is the matmuls with the same source operation
(`op_name` in the HLO metadata), direction (forward, or backward under `transpose(jvp(...))`) and
shapes, one per layer when the layers are unrolled. `gflops_per_s` is the group's FLOPs (2 x output
elements x contracted size) over its charged time, to compare with train_throughput.py's measured
peak. The profiler adds some overhead, so steps run a little slower than unprofiled.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import CONFIGS, machine_info, synthetic_batch  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import sharding  # noqa: E402
from jaxllm.training import train  # noqa: E402

NOT_OPERATIONS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjRt", "Execute")


def matmuls_by_fusion(hlo_text: str) -> dict[str, dict]:
    """{fusion or dot instruction name: {flops, op, shapes}} for every matmul in the program."""
    bodies = {m.group(1): m.group(2)
              for m in re.finditer(r"^%(\S+) \(.*?\n(.*?)^}", hlo_text, re.S | re.M)}
    all_shapes = dict(re.findall(r"%(\S+) = f32\[([\d,]*)\]", hlo_text))
    found = {}
    pattern = (r"%(\S+) = f32\[([\d,]*)\]\S* (fusion|dot)\((.*?)\)(.*?)"
               r"op_name=\"([^\"]*)\"")
    for m in re.finditer(pattern, hlo_text):
        name, out, kind, operands, attrs, op = m.groups()
        if kind == "fusion":
            called = re.search(r"calls=%(\S+?),", attrs)
            body = bodies.get(called.group(1), "") if called else ""
            dot = re.search(r"dot\(%(\S+), %(\S+)\), (.*)", body)
            if not dot:
                continue
            shapes = dict(re.findall(r"%(\S+) = f32\[([\d,]*)\]", body))
            lhs, rhs, dims = shapes.get(dot.group(1), ""), shapes.get(dot.group(2), ""), dot.group(3)
        else:
            names = re.findall(r"%(\S+)", operands)
            if len(names) != 2:
                continue
            lhs, rhs, dims = all_shapes.get(names[0], ""), all_shapes.get(names[1], ""), attrs
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dims)
        if not lhs or not contracting:
            continue
        lhs_dims = [int(d) for d in lhs.split(",") if d]
        contracted = math.prod(lhs_dims[int(i)] for i in contracting.group(1).split(",") if i)
        outputs = math.prod(int(d) for d in out.split(",") if d)
        found[name] = {"flops": 2 * outputs * contracted, "op": op, "shapes": f"[{lhs}] x [{rhs}] -> [{out}]"}
    return found


def charged_times(trace_dir: str) -> dict[str, float]:
    """{operation name: seconds}, concurrent operations sharing the time they overlap."""
    (path,) = glob.glob(os.path.join(trace_dir, "plugins/profile/*/perfetto_trace.json.gz"))
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    ops = [e for e in events if e.get("ph") == "X" and not e["name"].startswith(NOT_OPERATIONS)
           and " " not in e["name"]]
    edges = sorted([(e["ts"], 1, i) for i, e in enumerate(ops)] + [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(ops)])
    active, last, charge = set(), None, collections.Counter()
    for time_us, change, i in edges:
        if last is not None and time_us > last and active:
            for j in active:
                charge[ops[j]["name"]] += (time_us - last) / len(active) / 1e6
        last = time_us
        (active.add if change == 1 else active.discard)(i)
    return charge


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="d512", choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="matmul groups to print")
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]()
    cfg = dataclasses.replace(cfg, mesh=config_lib.MeshConfig(data=1, fsdp=-1, tensor=1, expert=1))
    mesh = sharding.make_mesh(cfg.mesh, jax.local_devices())
    s = train.setup(cfg, mesh)
    state = train.init_state(s, jax.random.key(cfg.seed))
    batch = sharding.place_batch(
        synthetic_batch(np.random.default_rng(0), cfg.train.batch_size, cfg.train.seq_len), mesh)
    with sharding.activate(mesh):
        compiled = train.make_train_step(s).jitted.lower(state, batch).compile()
        for _ in range(2):
            state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        trace_dir = tempfile.mkdtemp(prefix="step_profile_")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, metrics = compiled(state, batch)
                jax.block_until_ready(metrics)

    matmuls = matmuls_by_fusion(compiled.as_text())
    per_step = {name: t / args.steps for name, t in charged_times(trace_dir).items()}
    groups = collections.defaultdict(lambda: {"seconds": 0.0, "flops": 0, "count": 0})
    by_kind = collections.Counter()
    for name, seconds in per_step.items():
        by_kind[re.sub(r"[.\d]+$", "", name) + (" (matmul)" if name in matmuls else "")] += seconds
        if name in matmuls:
            m = matmuls[name]
            direction = "backward" if "transpose(" in m["op"] else "forward"
            key = (m["op"].split("/")[-2] if "/" in m["op"] else m["op"], direction, m["shapes"])
            groups[key]["seconds"] += seconds
            groups[key]["flops"] += m["flops"]
            groups[key]["count"] += 1
    ranked = sorted(groups.items(), key=lambda kv: -kv[1]["seconds"])
    for (op, direction, shapes), g in ranked[: args.top]:
        print(json.dumps({"config": args.config, "matmul": op, "direction": direction, "shapes": shapes,
                          "count": g["count"], "ms_per_step": g["seconds"] * 1e3,
                          "gflops_per_s": g["flops"] / g["seconds"] / 1e9}), flush=True)
    matmul_seconds = sum(g["seconds"] for g in groups.values())
    matmul_flops = sum(g["flops"] for g in groups.values())
    print(json.dumps({
        "config": args.config, "charged_s_per_step": sum(per_step.values()),
        "matmul_s_per_step": matmul_seconds, "matmul_gflops_per_s": matmul_flops / matmul_seconds / 1e9,
        "by_kind_ms_per_step": {k: round(v * 1e3, 1) for k, v in by_kind.most_common(15)},
        "machine": machine_info(),
    }), flush=True)


if __name__ == "__main__":
    main()
