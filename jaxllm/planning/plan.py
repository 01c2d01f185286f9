"""Plan a run for an accelerator pod from any host: build the experiment's real config, mesh,
born-sharded abstract train state and batch on a TPU topology's devices, compile the real train
step ahead of time, and read off what XLA says about it: per-device memory against the chip's HBM,
FLOPs, estimated step time and the MFU it implies, and the collectives in the program.

Nothing is allocated: every argument is a ShapeDtypeStruct with its NamedSharding.

XLA's cost model counts a loop body once, so a scanned stack's cost would be that of one layer
group. The per-group cost is measured instead from two unscanned compiles of the same model cut to
one and to two groups: step cost = c1 + (groups - 1) (c2 - c1).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm import sharding
from jaxllm.config import Config, ConfigError
from jaxllm.models import MODELS, count_params
from jaxllm.models.transformer import dense_prefix, group_size
from jaxllm.planning import generation as generation_lib
from jaxllm.planning import hlo
from jaxllm.planning.topology import GIB, Topology
from jaxllm.planning import topology as topology_lib
from jaxllm.training import flops, train

# libtpu's verdicts when a program cannot fit: "Used 40.56G of 15.48G hbm. Exceeded hbm capacity
# by 25.08G." or "the total memory required for HLO temporaries (16.77G) exceeds available HBM (15.75G)".
_OOM = (re.compile(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm"),
        re.compile(r"temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)"))
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def abstract_batch(cfg: Config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch as ShapeDtypeStructs with the batch sharding."""
    family = MODELS.get(cfg.family)
    if family.batch_spec is None:
        raise ConfigError(f"family {cfg.family} declares no batch_spec, so it cannot be planned without data")
    batch_sharding = sharding.batch_sharding(mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
            for name, (shape, dtype) in family.batch_spec(cfg).items()}


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        n = 1
        for d in shard:
            n *= d
        total += n * jnp.dtype(leaf.dtype).itemsize
    return total


def _compile_train_step(cfg: Config, mesh):
    s = train.setup(cfg, mesh)
    step = train.make_train_step(s, frozen=s.frozen_abstract if s.plan.freezes else None)
    batch = abstract_batch(cfg, mesh)
    args = (s.abstract_state, batch) + ((s.frozen_abstract,) if s.plan.freezes else ())
    with sharding.activate(mesh):
        lowered = step.jitted.lower(*args)
    return s, batch, lowered.compile()


def _unscanned(cfg: Config, groups: int, loss_chunk: int) -> Config:
    """`cfg` unscanned and cut to its dense prefix (moe.first_dense) plus `groups` scanned groups."""
    layers = dense_prefix(cfg.model) + groups * group_size(cfg.model)
    model = dataclasses.replace(cfg.model, num_layers=layers, scan_layers=False)
    return dataclasses.replace(cfg, model=model, train=dataclasses.replace(cfg.train, loss_chunk=loss_chunk))


def layer_cost(cfg: Config, mesh) -> dict[str, Any]:
    """XLA's flops, bytes and seconds for the whole step, the loop body counted `groups` times.

    The chunked loss is a loop too, so the cost compiles compute the loss in one piece (the same
    arithmetic); where those logits do not fit the chip, they keep the chunks and say so."""
    groups = (cfg.model.num_layers - dense_prefix(cfg.model)) // group_size(cfg.model)
    loss_chunk, loss_loop_once = 0, False
    try:
        c1 = hlo.cost(_compile_train_step(_unscanned(cfg, 1, 0), mesh)[2])
    except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory error has no type of its own
        if not cfg.train.loss_chunk or _does_not_fit(e) is None:
            raise
        loss_chunk, loss_loop_once = cfg.train.loss_chunk, True
        c1 = hlo.cost(_compile_train_step(_unscanned(cfg, 1, loss_chunk), mesh)[2])
    c2 = hlo.cost(_compile_train_step(_unscanned(cfg, 2, loss_chunk), mesh)[2])
    return ({k: c1[k] + (groups - 1) * (c2[k] - c1[k]) for k in c1}
            | {"one_group": c1, "two_groups": c2, "loss_loop_counted_once": loss_loop_once})


def _does_not_fit(error: Exception) -> tuple[float, float] | None:
    m = next((m for m in (p.search(str(error)) for p in _OOM) if m), None)
    if not m:
        return None
    return float(m.group(1)) * _UNITS[m.group(2)], float(m.group(3)) * _UNITS[m.group(4)]


def plan(cfg: Config, topo: Topology, costs: bool = True, generation: dict[str, int] | None = None) -> dict[str, Any]:
    """The report (a JSON-able dict) of `cfg`'s train step compiled for `topo`; with `generation`
    ({"batch", "prompt_len", "cache_len"}, None for the train shapes) also its prefill and one
    decode step (planning/generation.py)."""
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(
        cfg.mesh, **({"dcn_data": topo.num_slices} if topo.num_slices > 1 and cfg.mesh.num_slices == 1 else {})))
    if cfg.mesh.num_slices != topo.num_slices:
        raise ConfigError(f"mesh.dcn_data * mesh.dcn_fsdp = {cfg.mesh.num_slices} but the topology has "
                          f"{topo.num_slices} slices; make them equal")
    cfg = MODELS.get(cfg.family).finalize(cfg)
    devices = topology_lib.devices(topo)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    chips, chip = topo.num_devices, topo.chip
    report: dict[str, Any] = {
        "topology": topo.describe(), "chips": chips, "mesh": dict(mesh.shape),
        "hbm_gib": chip.hbm_bytes / GIB,
        "batch": {"global_rows": cfg.train.batch_size, "seq_len": cfg.train.seq_len,
                  "rows_per_chip": cfg.train.batch_size / chips},
        "model": {"family": cfg.family, "dtype": cfg.model.dtype, "remat": cfg.model.remat},
    }
    start = time.perf_counter()
    try:
        s, batch, compiled = _compile_train_step(cfg, mesh)
    except Exception as e:  # noqa: BLE001 - the compiler's out-of-memory error has no type of its own
        verdict = _does_not_fit(e)
        if verdict is None:
            raise
        used, capacity = verdict
        report.update(fits=False, compile_s=time.perf_counter() - start,
                      memory_gib={"total": used / GIB, "over_by": (used - capacity) / GIB})
        return report
    report["compile_s"] = time.perf_counter() - start
    params = count_params(s.abstract_state.params)
    report["model"]["params"] = params
    mem = compiled.memory_analysis()
    # Donated state aliases its outputs; what a device holds at the peak is the arguments, the
    # outputs that do not alias them and the temporaries (gradients, activations, workspace).
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    total += mem.generated_code_size_in_bytes
    state = s.abstract_state
    memory = {
        "params": per_device_bytes(state.params),
        "optimizer": per_device_bytes(state.opt_state),
        "ema": per_device_bytes(getattr(state, "ema", None) or {}),
        "batch": per_device_bytes(batch),
        "arguments": mem.argument_size_in_bytes,
        "outputs_not_aliased": mem.output_size_in_bytes - mem.alias_size_in_bytes,
        "temps": mem.temp_size_in_bytes,
        "code": mem.generated_code_size_in_bytes,
        "total": total,
    }
    # Newer libtpu also reports the live peak of its heap simulation (arguments included), which
    # the temps' reservation above can exceed by the allocator's fragmentation.
    peak = getattr(mem, "peak_memory_in_bytes", 0)
    if peak:
        memory["live_peak"] = peak
    report["memory_gib"] = {k: v / GIB for k, v in memory.items()}
    report["fits"] = total <= chip.hbm_bytes
    report["headroom_gib"] = (chip.hbm_bytes - total) / GIB
    text = compiled.as_text()
    report["collectives"] = hlo.collectives(text)
    # XLA's cost model does not look inside Pallas kernels (splash attention): their flops and
    # time are missing from its figures, which then overstate MFU.
    report["pallas_kernels"] = text.count("custom_call_target=\"tpu_custom_call\"")
    model_flops = flops.flops_per_token(cfg.model, cfg.train.seq_len) * cfg.train.batch_size * cfg.train.seq_len
    report["model_flops_per_step"] = model_flops
    if cfg.model.scan_layers:
        # `cost_analysis()` of the scanned program itself, its loop body counted once: what other
        # ahead-of-time tools print (MaxText's train_compile), kept for a like-for-like comparison.
        report["xla_body_once"] = hlo.cost(compiled)
    if costs:
        xla = layer_cost(cfg, mesh) if cfg.model.scan_layers else hlo.cost(compiled)
        report["xla_flops_per_device"] = xla["flops"]
        report["xla_bytes_per_device"] = xla["bytes"]
        report["xla_step_s"] = xla["seconds"]
        report["xla_cost_parts"] = {k: v for k, v in xla.items() if k.endswith(("group", "groups", "once"))}
        # XLA's own estimate can come out negative (libtpu's cost model on the MoE layers'
        # expert matmuls); the roofline of its flops and bytes is the fallback, named as such.
        report["roofline_step_s"] = max(xla["flops"] / chip.peak_flops, xla["bytes"] / chip.hbm_bandwidth)
        seconds = xla["seconds"] if xla["seconds"] > 0 else report["roofline_step_s"]
        report["mfu_from"] = "xla" if xla["seconds"] > 0 else "roofline"
        # MFU = model FLOPs (PaLM: 6N + attention, no recomputation) / (chips x peak x step time).
        report["mfu"] = model_flops / (chips * chip.peak_flops * seconds) if seconds > 0 else None
    if generation is not None:
        shapes = {"batch": cfg.train.batch_size, "prompt_len": cfg.train.seq_len // 2, "cache_len": cfg.train.seq_len}
        shapes |= {k: v for k, v in generation.items() if v is not None}
        report["generation"] = generation_lib.plan_generation(cfg, mesh, chip, **shapes)
    return report


def format_report(r: dict[str, Any]) -> str:
    """The report as a short table for a terminal."""
    lines = [f"{r['topology']}: mesh {r['mesh']}, {r['batch']['global_rows']} x {r['batch']['seq_len']} tokens "
             f"({r['batch']['rows_per_chip']:g} rows per chip), compiled in {r['compile_s']:.0f} s"]
    m = r["memory_gib"]
    if not r["fits"] and "params" not in m:
        lines.append(f"DOES NOT FIT: needs {m['total']:.2f} GiB per device, {m['over_by']:.2f} GiB over "
                     f"the {r['hbm_gib']:.0f} GiB of HBM")
        return "\n".join(lines)
    lines.append(f"{r['model']['params'] / 1e9:.2f}B params; per device GiB: params {m['params']:.2f}, optimizer "
                 f"{m['optimizer']:.2f}, batch {m['batch']:.3f}, temps (gradients, activations) {m['temps']:.2f}, "
                 f"total {m['total']:.2f} of {r['hbm_gib']:.0f}"
                 + (f" (live peak {m['live_peak']:.2f})" if "live_peak" in m else ""))
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    lines.append(f"{verdict}: {abs(r['headroom_gib']):.2f} GiB {'to spare' if r['fits'] else 'over'}")
    if r.get("xla_step_s") is not None and r["xla_step_s"] <= 0:
        lines.append(f"XLA estimate unusable ({r['xla_step_s']:.3f} s per step); roofline of its flops and bytes: "
                     f"{r['roofline_step_s']:.3f} s, {r['xla_flops_per_device'] / 1e12:.1f} TFLOP per device "
                     f"(model {r['model_flops_per_step'] / r['chips'] / 1e12:.1f}); MFU at that bound {r['mfu']:.3f}")
    elif r.get("xla_step_s"):
        lines.append(f"XLA estimate: {r['xla_step_s']:.3f} s per step, {r['xla_flops_per_device'] / 1e12:.1f} TFLOP "
                     f"per device (model {r['model_flops_per_step'] / r['chips'] / 1e12:.1f}); MFU {r['mfu']:.3f}")
    if r.get("xla_body_once"):
        lines.append(f"  (cost_analysis() of the scanned program, its layer loop counted once, as MaxText's "
                     f"train_compile prints it: {r['xla_body_once']['seconds']:.3f} s)")
    if r.get("pallas_kernels") and r.get("xla_step_s") is not None:
        lines.append(f"  (the program calls {r['pallas_kernels']} Pallas kernels, whose flops and time XLA's "
                     "estimate leaves out: an upper bound on MFU)")
    for kind, c in r["collectives"].items():
        lines.append(f"  {kind:<20} {c['count']:>6} per step  {c['bytes'] / GIB:8.2f} GiB per device")
    if "generation" in r:
        lines.append(generation_lib.format_generation(r["generation"], r["hbm_gib"]))
    return "\n".join(lines)
