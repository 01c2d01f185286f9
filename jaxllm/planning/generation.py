"""Plan generation for a pod: compile the prompt pass (prefill) and one cached decode step of
`decoding.Generator` ahead of time on a topology's devices, with abstract params and KV cache
placed as a real `python -m jaxllm.generate` run places them, and read off memory, XLA's
estimated time and the collectives of each.

Decoding runs the blocks unrolled (see decoding.Generator), so XLA's cost model sees every layer
and its estimate needs no correction for a scanned loop.

Shape legend: B batch, P prompt length, S cache length.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm import decoding, restore, sharding
from jaxllm.config import Config, ConfigError
from jaxllm.planning import hlo
from jaxllm.planning.topology import GIB, Chip


def _figures(compiled, seconds_label: str, chip: Chip) -> dict[str, Any]:
    mem = compiled.memory_analysis()
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    cost = hlo.cost(compiled)
    return {
        "memory_gib": {"arguments": mem.argument_size_in_bytes / GIB, "temps": mem.temp_size_in_bytes / GIB,
                       "total": total / GIB},
        "fits": total <= chip.hbm_bytes,
        "xla_flops_per_device": cost["flops"],
        "xla_bytes_per_device": cost["bytes"],
        seconds_label: cost["seconds"],
        "collectives": hlo.collectives(compiled.as_text()),
    }


def _abstract_cache(generator: decoding.Generator, mesh, B: int, S: int):
    """The KV cache as ShapeDtypeStructs, rows (batch, KV head) over the batch axes and tensor as
    ops.update_cache constrains them; slot bookkeeping over the batch axes."""
    shapes = jax.eval_shape(lambda: generator.init_cache(B, S))
    rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES + ("tensor",)))
    batch = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))

    def place(path, s):
        name = jax.tree_util.keystr(path[-1:])
        spec = rows if "key" in name or "value" in name else batch if s.ndim else sharding.replicated(mesh)
        return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=spec)

    return jax.tree_util.tree_map_with_path(place, shapes)


def plan_generation(cfg: Config, mesh, chip: Chip, batch: int, prompt_len: int, cache_len: int) -> dict[str, Any]:
    """Prefill of `batch` prompts of `prompt_len` tokens into a `cache_len`-slot cache, and one
    decode step, compiled on `mesh`; figures per program and the decode rate they imply."""
    if not 0 < prompt_len < cache_len:
        raise ConfigError(f"--prompt_len {prompt_len} must be positive and below the cache length {cache_len}")
    multiple = sharding.axis_size(mesh, sharding.BATCH_AXES)
    if batch % multiple:
        raise ConfigError(f"--decode_batch {batch} must divide over the mesh's batch axes "
                          f"(data x fsdp x expert = {multiple}); pick a multiple of {multiple}")
    # Only the pad and EOS ids come from the tokenizer; the plan needs no tokenizer file.
    model_cfg = dataclasses.replace(cfg.model, tokenizer="bytes")
    generator = decoding.Generator(model_cfg, mesh)
    # Unscanned params, sharded as a restored run's are.
    params = restore.abstract_params(
        dataclasses.replace(cfg, model=dataclasses.replace(model_cfg, scan_layers=False)), mesh)
    cache = _abstract_cache(generator, mesh, batch, cache_len)
    rows = NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES))

    def ints(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=rows)

    report: dict[str, Any] = {"batch": batch, "prompt_len": prompt_len, "cache_len": cache_len}
    with sharding.activate(mesh):
        # In the layout generation decodes with (decode_params: the layers' kernels in the compute
        # dtype, as `python -m jaxllm.generate` keeps them), placed as XLA places them.
        prepared = decoding.Generator.decode_params.lower(generator, params).compile().out_info
        params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding), prepared)
        start = time.perf_counter()
        prefill = decoding.Generator.prefill.lower(generator, params, cache, ints(batch, prompt_len), ints(batch, prompt_len),
                                          ints(batch, prompt_len), ints(batch)).compile()
        report["prefill"] = _figures(prefill, "xla_s", chip) | {"compile_s": time.perf_counter() - start}
        start = time.perf_counter()
        step = decoding.Generator.decode_step.lower(generator, params, cache, ints(batch), ints(batch)).compile()
        report["decode_step"] = _figures(step, "xla_s", chip) | {"compile_s": time.perf_counter() - start}
    report["fits"] = report["prefill"]["fits"] and report["decode_step"]["fits"]
    seconds = report["decode_step"]["xla_s"]
    report["decode_tokens_per_s"] = batch / seconds if seconds > 0 else None
    return report


def format_generation(g: dict[str, Any], hbm_gib: float) -> str:
    lines = [f"generation: {g['batch']} prompts of {g['prompt_len']} tokens, {g['cache_len']}-slot cache"]
    for name in ("prefill", "decode_step"):
        r = g[name]
        m = r["memory_gib"]
        lines.append(f"  {name:<12} {m['total']:.2f} of {hbm_gib:.0f} GiB per device (arguments {m['arguments']:.2f}, "
                     f"temps {m['temps']:.2f}){'' if r['fits'] else ' DOES NOT FIT'}; XLA {r['xla_s'] * 1e3:.2f} ms; "
                     + ", ".join(f"{k} {c['count']:g}" for k, c in r["collectives"].items()))
    if g["decode_tokens_per_s"]:
        lines.append(f"  decode: {g['decode_tokens_per_s']:.0f} tokens/s over the batch at XLA's estimate")
    return "\n".join(lines)
