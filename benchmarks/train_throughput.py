"""Training throughput and MFU of the real train step, one JSON object per configuration.

    python benchmarks/train_throughput.py [--configs tiny,d512] [--steps 8] [--warmup 2]
                                          [--set model.scan_layers=false ...]

Each line holds the configuration, tokens/s, the median step time over `--steps` timed steps (after
`--warmup` untimed ones), model TFLOP/s and MFU, compile time, peak memory and the machine. The step
is the one training uses: `train.setup` -> `train.init_state` -> `train.make_train_step`, on a mesh
of all local devices, fed synthetic packed batches (random tokens, two documents per row, padded
tails) so no dataset is needed.

MFU = model FLOPs per step (jaxllm.flops: PaLM's 6N per token plus attention) / step time / peak.
On CPU the peak is measured in this run, before and after the steps (best of both): the best FLOP/s
over float32 square matmuls (flops.SQUARE_MATMUL_SIZES) and the model's own largest matmul shape.
On an accelerator it is the rated bf16 peak per chip times the device count. The lines are printed
once every configuration has run, since the peak is only known then.

On a shared machine, `other_processes_cpu_share` says how much of the CPU other processes used
while the steps were timed; a value above a few percent means the timings are disturbed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import sys
import time

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import small_lm  # noqa: E402  (found through the sys.path entry above)
import tiny_lm  # noqa: E402

from jaxllm import config as config_lib  # noqa: E402
from jaxllm import sharding  # noqa: E402
from jaxllm.training import flops, train  # noqa: E402


def d512_config() -> config_lib.Config:
    """A ~26M-parameter model whose matmuls are big enough to be compute-bound on a CPU."""
    base = tiny_lm.get_config()
    return dataclasses.replace(
        base,
        model=dataclasses.replace(
            config_lib.ModelConfig(), d_model=512, num_layers=8, num_heads=8, num_kv_heads=8,
            mlp_dim=1408, dtype="float32",
        ),
        train=dataclasses.replace(base.train, batch_size=8, seq_len=256),
    )


def small_per_device_config() -> config_lib.Config:
    """small_lm (~100M parameters, bfloat16, remat save_dots, seq_len 1024) with one device's
    share of its 256-row batch on an 8-device mesh: for a single accelerator."""
    base = small_lm.get_config()
    return dataclasses.replace(base, train=dataclasses.replace(base.train, batch_size=32))


CONFIGS = {"tiny": tiny_lm.get_config, "d512": d512_config, "small": small_per_device_config}


def synthetic_batch(rng: np.random.Generator, batch_size: int, seq_len: int, vocab: int = 259):
    """Random byte tokens packed like the real data: each row holds two documents (positions
    restart at the cut) and ends in a few padding tokens (segment 0, weight 0)."""
    inputs = rng.integers(0, vocab, (batch_size, seq_len)).astype(np.int32)
    targets = rng.integers(0, vocab, (batch_size, seq_len)).astype(np.int32)
    segment_ids = np.ones((batch_size, seq_len), np.int32)
    positions = np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1))
    pad = min(3, seq_len // 8)
    for row in range(batch_size):
        cut = int(rng.integers(seq_len // 8, seq_len - seq_len // 8))
        segment_ids[row, cut:] = 2
        positions[row, cut:] = np.arange(seq_len - cut)
    weights = np.ones((batch_size, seq_len), np.float32)
    if pad:
        weights[:, -pad:] = 0.0
        segment_ids[:, -pad:] = 0
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": positions, "weights": weights}


def machine_info() -> dict:
    device = jax.devices()[0]
    cpu_model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                cpu_model,
            )
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, CPU jiffies of this process), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _, _, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return user + nice + system + irq + softirq + steal, int(fields[11]) + int(fields[12])
    except (OSError, ValueError):
        return None


def peak_memory() -> tuple[int, str]:
    """(bytes, source): the device allocator's peak where it reports one, else the process's max
    RSS, which on CPU includes everything the process has touched so far (a high-water mark over
    all configurations run before this one)."""
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device_memory_stats.peak_bytes_in_use"
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, "process_max_rss"


def measure_peak(cfgs: list[config_lib.Config]) -> dict:
    """{(m, k, n): best FLOP/s} over the square matmuls and each config's largest matmul."""
    shapes = [(n, n, n) for n in flops.SQUARE_MATMUL_SIZES]
    for cfg in cfgs:
        shape = flops.largest_matmul_shape(cfg.model, cfg.train.batch_size * cfg.train.seq_len)
        if shape not in shapes:
            shapes.append(shape)
    return flops.measure_matmul_flops(shapes, per_shape=True)


def peak_flops(cfg: config_lib.Config, rates: dict) -> tuple[float, str]:
    """(FLOP/s, what set it) for MFU's denominator: on an accelerator the rated peak, on CPU the
    best measured rate among the square matmuls and this config's own largest matmul."""
    if jax.default_backend() != "cpu":
        rated = flops.rated_peak_flops()
        if rated:
            return rated * jax.device_count(), f"rated bf16 peak x {jax.device_count()} devices"
    own = flops.largest_matmul_shape(cfg.model, cfg.train.batch_size * cfg.train.seq_len)
    candidates = {s: r for s, r in rates.items() if s == own or s[0] == s[1] == s[2]}
    best = max(candidates, key=candidates.get)
    return candidates[best], "float32 matmul %dx%dx%d (measured)" % best


def run_config(name: str, cfg: config_lib.Config, steps: int, warmup: int) -> dict:
    """Times the train step; MFU is filled in by `add_mfu` once the peak is known."""
    mesh = sharding.make_mesh(cfg.mesh, jax.local_devices())
    s = train.setup(cfg, mesh)
    state = train.init_state(s, jax.random.key(cfg.seed))
    train_step = train.make_train_step(s)
    rng = np.random.default_rng(0)
    batches = [
        sharding.place_batch(synthetic_batch(rng, cfg.train.batch_size, cfg.train.seq_len), mesh)
        for _ in range(2)
    ]

    start = time.perf_counter()
    with sharding.activate(mesh):
        compiled = train_step.jitted.lower(state, batches[0]).compile()
    compile_s = time.perf_counter() - start

    def step(state, i):
        # The compiled executable of make_train_step's jit: same program, donation included.
        with sharding.activate(mesh):
            state, metrics = compiled(state, batches[i % len(batches)])
        jax.block_until_ready(metrics)
        return state, metrics

    for i in range(warmup):
        state, metrics = step(state, i)
    times = []
    jiffies_before, start = _cpu_jiffies(), time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, i)
        times.append(time.perf_counter() - t0)
    jiffies_after, elapsed = _cpu_jiffies(), time.perf_counter() - start
    # On a shared machine other processes slow the step down: report how much of the machine
    # they used while the steps were timed, so a disturbed measurement can be recognised.
    other_load = None
    if jiffies_before and jiffies_after:
        tick = os.sysconf("SC_CLK_TCK")
        other = (jiffies_after[0] - jiffies_before[0]) - (jiffies_after[1] - jiffies_before[1])
        other_load = max(other, 0) / (tick * elapsed * os.cpu_count())

    step_time = statistics.median(times)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    model_flops = flops.flops_per_token(cfg.model, cfg.train.seq_len) * tokens
    memory, memory_source = peak_memory()
    xla_memory = compiled.memory_analysis()
    return {
        "config": name,
        "model": dataclasses.asdict(cfg.model),
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.train.seq_len,
        "mesh": dict(mesh.shape),
        "params": sum(x.size for x in jax.tree.leaves(state.params)),
        "tokens_per_s": tokens / step_time,
        "step_time_s": step_time,
        "step_time_min_s": min(times),
        "step_times_s": [round(t, 4) for t in times],
        "model_flops_per_step": model_flops,
        "tflops": model_flops / step_time / 1e12,
        "compile_s": compile_s,
        "other_processes_cpu_share": other_load,
        "peak_memory_bytes": memory,
        "peak_memory_source": memory_source,
        "xla_temp_bytes": getattr(xla_memory, "temp_size_in_bytes", None),
        "loss": float(metrics["loss"]),
        "machine": machine_info(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,d512", help="comma-separated: " + ",".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides applied to every configuration, e.g. model.remat=full")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")

    cfgs = []
    for name in names:
        cfg = config_lib.override(CONFIGS[name](), args.set)
        # All local devices, data-parallel over fsdp (which also shards the optimizer state).
        cfgs.append(dataclasses.replace(cfg, mesh=config_lib.MeshConfig(data=1, fsdp=-1, tensor=1, expert=1)))
    # The peak is measured before and after the steps and the best rate kept, so that a moment of
    # load from another process lowers neither measurement's share of the denominator.
    on_cpu = jax.default_backend() == "cpu"
    rates = measure_peak(cfgs) if on_cpu else {}
    results = [run_config(name, cfg, args.steps, args.warmup) for name, cfg in zip(names, cfgs)]
    if on_cpu:
        for shape, rate in measure_peak(cfgs).items():
            rates[shape] = max(rate, rates.get(shape, 0.0))
    for cfg, result in zip(cfgs, results):
        peak, source = peak_flops(cfg, rates)
        result.update(peak_flops=peak, peak_source=source,
                      mfu=result["model_flops_per_step"] / result["step_time_s"] / peak)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
