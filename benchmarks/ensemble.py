"""Ensemble cost: evaluation time of an N-member ensemble (one jitted program) against the sum of
its members' evaluation times (each its own jitted program, as `python -m jaxllm.quantize
--eval_batches` evaluates a run), and decoding tokens/s of a 2-member ensemble against one member.
One JSON object per line.

    python benchmarks/ensemble.py --workdir runs/ens_lm_0 --workdir runs/ens_lm_1 [--workdir ...]
        [--eval_batches 4] [--repeats 5] [--batch 8] [--prompt_len 64] [--new_tokens 64]

Evaluation: the same --eval_batches validation batches, placed once; one untimed pass compiles;
then --repeats rounds, each timing every member alone and the ensemble, in turn (so load from
other processes hits all alike). `ratio` = median ensemble time / sum of the members' medians
(target <= 1.1). Decoding: greedy generation of --new_tokens tokens for --batch prompts of
--prompt_len tokens, cached; tokens/s = batch / median decode-step time, one member (the first)
vs the first two members' mean_prob ensemble, in alternating rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

from train_throughput import machine_info  # noqa: E402

from jaxllm import data  # noqa: E402
from jaxllm.combine import ensemble  # noqa: E402
from jaxllm.combine.generation import EnsembleGenerator  # noqa: E402
from jaxllm.decoding import Generator, SamplingConfig  # noqa: E402
from jaxllm.training import train  # noqa: E402


def member_eval_steps(ens):
    """Each member's own jitted evaluation step (the family's eval_fn), on the ensemble's mesh."""
    steps = []
    for cfg, params in zip(ens.cfgs, ens.params):
        s = train.setup(cfg, ens.mesh)
        steps.append(train.make_eval_step(s, param_shardings=jax.tree.map(lambda x: x.sharding, params)))
    return steps


def timed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def time_evaluation(ens, num_batches: int, repeats: int) -> dict:
    batches = ensemble.eval_batches(ens)
    placed = [train.place_rows(batches, k, ens.mesh) for k in range(num_batches)]
    members = member_eval_steps(ens)
    combined = ensemble.make_eval_step(ens)

    def run_member(i):
        return [members[i](ens.params[i], b) for b in placed]

    def run_ensemble():
        return [combined(ens.params, b) for b in placed]

    for i in range(len(members)):
        timed(lambda i=i: run_member(i))  # compiles
    timed(run_ensemble)
    member_times = [[] for _ in members]
    ensemble_times = []
    for _ in range(repeats):
        for i in range(len(members)):
            member_times[i].append(timed(lambda i=i: run_member(i)))
        ensemble_times.append(timed(run_ensemble))
    member_s = [statistics.median(t) for t in member_times]
    ensemble_s = statistics.median(ensemble_times)
    return {"members_s": member_s, "sum_members_s": sum(member_s), "ensemble_s": ensemble_s,
            "ratio": ensemble_s / sum(member_s)}


def time_decoding(ens, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    cfg = ens.cfgs[0]
    rows = data.Batches(cfg.data, cfg.data.eval_split, prompt_len, batch, shuffle=False).global_batch(0)
    prompts = [[data.BOS_ID, *row[: prompt_len - 1].tolist()] for row in rows["inputs"]]
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)
    one = Generator(cfg.model, ens.mesh)
    two = EnsembleGenerator([c.model for c in ens.cfgs[:2]], (0.5, 0.5), "mean_prob", ens.mesh)
    runs = {"one_member": (one, ens.params[0]), "two_members": (two, ens.params[:2])}
    for gen, params in runs.values():
        gen.generate(params, prompts, sampling, jax.random.key(0))  # compiles
    steps = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (gen, params) in runs.items():
            gen.generate(params, prompts, sampling, jax.random.key(0))
            steps[name].extend(gen.last_timings["step_s"])
    out = {f"{name}_tokens_per_s": batch / statistics.median(s) for name, s in steps.items()}
    out["slowdown"] = out["one_member_tokens_per_s"] / out["two_members_tokens_per_s"]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", action="append", required=True, help="two or more language-model runs")
    parser.add_argument("--eval_batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if len(args.workdir) < 2:
        parser.error("give two or more --workdir")
    command = "python benchmarks/ensemble.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ens = ensemble.load(args.workdir)
    common = {"members": len(args.workdir), "workdirs": args.workdir, "machine": machine_info(),
              "command": command}
    print(json.dumps({"kind": "evaluation", "eval_batches": args.eval_batches, "batch_size": ens.cfgs[0].train.batch_size,
                      **time_evaluation(ens, args.eval_batches, args.repeats), **common}), flush=True)
    if ens.family == "causal_lm":
        print(json.dumps({"kind": "decoding", "batch": args.batch, "prompt_len": args.prompt_len,
                          "new_tokens": args.new_tokens,
                          **time_decoding(ens, args.batch, args.prompt_len, args.new_tokens, args.repeats),
                          **common}), flush=True)


if __name__ == "__main__":
    main()
