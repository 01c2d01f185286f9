"""Decode speed with and without the KV cache, float32 vs int8 weights; weight bytes and validation
loss float vs int8. One JSON object per line.

    python benchmarks/decode.py [--workdir runs/tiny_lm] [--batches 1,8] [--prompts 64,512]
                                [--new_tokens 128] [--repeats 5] [--eval_batches 8]

Without --workdir it first trains the default experiment (tiny_lm) for --train_steps steps into a
temporary directory. The int8 checkpoint is written with `jaxllm.cli.quantize.quantize_workdir`, and both
checkpoints are loaded the way `python -m jaxllm.generate` loads them.

Per (batch, prompt length, weights), with the prompts cut from the validation text:
- cached: a whole greedy `Generator.generate` of --new_tokens tokens, timed --repeats times after one
  untimed run (compilation); the runs of every prompt length and weight kind of one batch size
  take turns, round by round. `decode_step_s` is the median time of one decode step (one new token
  per row), `tokens_per_s` = batch / decode_step_s, `generate_tokens_per_s` counts the prompt pass.
- recompute: no cache; every new token runs the whole fixed-length buffer (prompt + new tokens,
  future slots masked) through the model. Every step has the same cost, so --recompute_steps timed
  steps (after one untimed) give the median step time; tokens/s = batch / step time.
The float and int8 recompute runs of one shape alternate, so a burst of load from other processes
hits both.
`position_ratio` lines compare the cached step time after a 512-token prompt with that after a
64-token one (target <= 1.3).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import small_lm  # noqa: E402
import tiny_lm  # noqa: E402
from train_throughput import machine_info  # noqa: E402

from jaxllm import data, decoding, restore  # noqa: E402
from jaxllm.cli import quantize as quantize_cli  # noqa: E402
from jaxllm.compression import quantize  # noqa: E402
from jaxllm.training import train  # noqa: E402
from jaxllm import config as config_lib  # noqa: E402


def train_default(workdir: str, steps: int) -> None:
    cfg = config_lib.override(tiny_lm.get_config(), [
        f"workdir={workdir}", f"train.steps={steps}", f"train.eval_every={steps}",
        f"checkpoint.every={steps}", "train.progress_bar=false",
    ])
    train.train(cfg, log=lambda record: None)


def prompts_from_validation(cfg, batch: int, length: int) -> list[list[int]]:
    rows = data.Batches(cfg.data, cfg.data.eval_split, length, batch, shuffle=False).global_batch(0)
    return [[data.BOS_ID, *row[: length - 1].tolist()] for row in rows["inputs"]]


def time_cached(gen, params, prompts, sampling, repeats):
    """{(prompt length, weights): (median step s, median prefill s, median generate s)}.

    `prompts` and `params` map prompt lengths and weight kinds to their inputs. Every combination
    is compiled first; then each round runs every combination once, so load from other processes
    during a round hits all of them alike and the position ratio compares like with like."""
    keys = [(length, name) for length in prompts for name in params]
    for length, name in keys:
        gen.generate(params[name], prompts[length], sampling, jax.random.key(0))  # compiles
    steps, totals, prefills = ({key: [] for key in keys} for _ in range(3))
    for _ in range(repeats):
        for length, name in keys:
            start = time.perf_counter()
            gen.generate(params[name], prompts[length], sampling, jax.random.key(0))
            totals[length, name].append(time.perf_counter() - start)
            steps[length, name].extend(gen.last_timings["step_s"])
            prefills[length, name].append(gen.last_timings["prefill_s"])
    return {key: (statistics.median(steps[key]), statistics.median(prefills[key]),
                  statistics.median(totals[key])) for key in keys}


def time_recompute(gen, params, prompts, new_tokens, steps):
    tokens, segment_ids, positions, lengths = decoding.pad_prompts(prompts)
    B, P = tokens.shape
    T = P + new_tokens
    buf = [np.zeros((B, T), np.int32) for _ in range(3)]
    buf[0][:, :P], buf[1][:, :P], buf[2][:, :P] = tokens, segment_ids, positions
    # Mid-generation: half the new tokens are in place (the cost does not depend on it).
    middle = P + new_tokens // 2
    buf[1][:, P:middle] = 1
    buf[2][:, P:middle] = lengths[:, None] + np.arange(middle - P)
    last = np.full(B, middle - 1, np.int32)
    jax.block_until_ready(gen.recompute_step(params, *buf, last))  # compiles
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        np.asarray(gen.recompute_step(params, *buf, last))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", help="trained float run directory (default: train tiny_lm)")
    parser.add_argument("--train_steps", type=int, default=150)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompts", default="64,512")
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--recompute_steps", type=int, default=8)
    parser.add_argument("--eval_batches", type=int, default=8)
    args = parser.parse_args(argv)
    command = "python benchmarks/decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = machine_info()
    lines = []

    def emit(record):
        record = {**record, "command": command.strip()}
        lines.append(record)
        print(json.dumps(record), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir
        if workdir is None:
            workdir = os.path.join(tmp, "tiny_lm")
            start = time.perf_counter()
            train_default(workdir, args.train_steps)
            print(f"# trained tiny_lm for {args.train_steps} steps in {time.perf_counter() - start:.0f}s",
                  file=sys.stderr)
        int8_dir = os.path.join(tmp, "int8")
        quantize_cli.quantize_workdir(workdir, int8_dir)
        cfg, float_params = restore.load_params(workdir)
        _, int8_params = restore.load_params(int8_dir)
        params = {"float32": float_params, "int8": int8_params}

        float_bytes, int8_bytes = (quantize.weight_bytes(p) for p in params.values())
        float_kernels, int8_kernels = (quantize.kernel_bytes(p) for p in params.values())
        emit({"metric": "weight_bytes", "float32": float_bytes, "int8": int8_bytes,
              "ratio": int8_bytes / float_bytes, "kernel_bytes_float32": float_kernels,
              "kernel_bytes_int8": int8_kernels, "kernel_ratio": int8_kernels / float_kernels,
              "target_ratio": 0.27, "note": "weight_bytes: all params (embedding and norms stay "
              "float32); kernel_bytes: the quantized kernels (int8 values + float32 scales)"})
        # The embedding and norms stay float32, so the whole-model ratio depends on their share of
        # the params: ~3% in tiny_lm, under 0.3% in small_lm. Sizes follow from shapes alone.
        whole_machine = config_lib.MeshConfig(data=1, fsdp=-1, tensor=1, expert=1)
        small = train.setup(dataclasses.replace(small_lm.get_config(), mesh=whole_machine))
        float_b = quantize.weight_bytes(small.abstract_state.params)
        int8_b = quantize.weight_bytes(quantize.quantized_abstract(small.abstract_state.params))
        emit({"metric": "weight_bytes_from_shapes", "config": "small_lm", "float32": float_b,
              "int8": int8_b, "ratio": int8_b / float_b, "target_ratio": 0.27})

        losses = {name: quantize_cli.evaluate_workdir(w, args.eval_batches)["eval_loss"]
                  for name, w in (("float32", workdir), ("int8", int8_dir))}
        emit({"metric": "validation_loss", **losses,
              "relative_increase": losses["int8"] / losses["float32"] - 1, "target": 0.01,
              "eval_batches": args.eval_batches,
              "eval_tokens_per_batch": cfg.train.batch_size * cfg.train.seq_len})

        gen = decoding.Generator(cfg.model)
        sampling = decoding.SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0,
                                           stop_at_eos=False)
        step_times = {}
        for batch in map(int, args.batches.split(",")):
            prompts = {length: prompts_from_validation(cfg, batch, length)
                       for length in map(int, args.prompts.split(","))}
            cached = time_cached(gen, params, prompts, sampling, args.repeats)
            for prompt_len in prompts:
                results = {}
                for name in ("float32", "int8"):  # alternating, see the docstring
                    recompute_s = time_recompute(gen, params[name], prompts[prompt_len],
                                                 args.new_tokens, args.recompute_steps)
                    results[name] = (*cached[prompt_len, name], recompute_s)
                    step_times[batch, prompt_len, name] = cached[prompt_len, name][0]
                for name, (step_s, prefill_s, total_s, recompute_s) in results.items():
                    emit({"metric": "decode", "batch": batch, "prompt_len": prompt_len,
                          "new_tokens": args.new_tokens, "weights": name,
                          "cached_decode_step_s": step_s, "cached_tokens_per_s": batch / step_s,
                          "cached_prefill_s": prefill_s,
                          "cached_generate_tokens_per_s": batch * args.new_tokens / total_s,
                          "recompute_step_s": recompute_s, "recompute_tokens_per_s": batch / recompute_s,
                          "cache_speedup": recompute_s / step_s,
                          "int8_vs_float32_cached_speed": (results["float32"][0] / results["int8"][0]),
                          "loadavg_1m": os.getloadavg()[0]})
        prompt_lens = sorted(map(int, args.prompts.split(",")))
        short, long = prompt_lens[0], prompt_lens[-1]
        for batch in map(int, args.batches.split(",")):
            for name in ("float32", "int8"):
                if (batch, long, name) in step_times and short != long:
                    emit({"metric": "position_ratio", "batch": batch, "weights": name,
                          "short_prompt": short, "long_prompt": long,
                          "step_s_short": step_times[batch, short, name],
                          "step_s_long": step_times[batch, long, name],
                          "ratio": step_times[batch, long, name] / step_times[batch, short, name],
                          "target": 1.3})
    emit({"metric": "machine", **machine})


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
