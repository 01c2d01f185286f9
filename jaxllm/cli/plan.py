"""Compile an experiment's train step ahead of time for a TPU topology, from any host (no TPU
needed: libtpu describes the chips), and report memory, XLA's step time, MFU and collectives.

    python -m jaxllm.plan experiments/llama3_8b.py --topology v5p-128
    python -m jaxllm.plan experiments/tiny_lm.py model.dtype=bfloat16 --topology v5e-16 --num_slices 2 --json plan.json
    python -m jaxllm.plan experiments/llama3_8b.py --topology v5p-128 --generation --decode_batch 64 --prompt_len 1024
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from typing import Sequence

# Before JAX starts: the plan only compiles, on the CPU backend; libtpu's C++ start-up chatter
# about the missing TPU is noise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from jaxllm.config import ConfigError, override  # noqa: E402
from jaxllm.planning import plan, topology  # noqa: E402


def load_experiment(path: str):
    """The experiment module at `path` (experiments import their base experiments by name)."""
    if not path.endswith(".py") or not os.path.isfile(path):
        raise ConfigError(f"{path} is not an experiment file; give a path such as experiments/llama3_8b.py")
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    return module


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Plan a run for a TPU pod: compile its train step ahead of time.")
    parser.add_argument("experiment", help="an experiment file, e.g. experiments/llama3_8b.py")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value, as for the experiment")
    parser.add_argument("--topology", required=True, help="v5p-128, v5e-16, v6e-256, or v5p:4x4x8 ...")
    parser.add_argument("--num_slices", type=int, default=1, help="slices joined over DCN (mesh.dcn_data by default)")
    parser.add_argument("--no_costs", action="store_true",
                        help="skip the two small compiles that measure XLA's per-layer cost")
    parser.add_argument("--json", help="also write the report to this file")
    parser.add_argument("--generation", action="store_true",
                        help="also compile the prefill and one decode step of generation")
    parser.add_argument("--decode_batch", type=int, help="prompts decoded together (default: train.batch_size)")
    parser.add_argument("--prompt_len", type=int, help="prompt tokens per row (default: train.seq_len / 2)")
    parser.add_argument("--cache_len", type=int, help="KV cache slots (default: train.seq_len)")
    args = parser.parse_args(argv)
    try:
        topo = topology.parse(args.topology, args.num_slices)
        cfg = override(load_experiment(args.experiment).get_config(), args.overrides)
        generation = ({"batch": args.decode_batch, "prompt_len": args.prompt_len, "cache_len": args.cache_len}
                      if args.generation else None)
        report = plan.plan(cfg, topo, costs=not args.no_costs, generation=generation)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    report["experiment"], report["overrides"] = args.experiment, list(args.overrides)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(plan.format_report(report))
    sys.exit(0 if report["fits"] else 1)


if __name__ == "__main__":
    main()
