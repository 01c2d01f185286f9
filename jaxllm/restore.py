"""One restore path: a run directory's params (float, int8/int4-quantized, pruned, MoE, distilled)
onto any mesh, for inference and for the tools, without building an optimizer.

    cfg, params = restore.load_params("runs/tiny_lm")            # the local devices' mesh
    params, step, meta = restore.restore_params(directory, cfg, mesh)   # a given mesh

The target tree comes from `jax.eval_shape` of the family's module, so every array is read
straight into its shards on the mesh, whatever mesh wrote it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import config as config_lib
from jaxllm import sharding, validation
from jaxllm.compression import quantize
from jaxllm.config import Config, ConfigError
from jaxllm.models import MODELS
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import ema as ema_lib
from jaxllm.training import finetune


def abstract_params(cfg: Config, mesh: jax.sharding.Mesh, model: nn.Module | None = None, part: str = "model"):
    """ShapeDtypeStructs of the family's float params, with their shardings on `mesh`: the whole
    model's, or (`part`) the "trainable" or "frozen" part of a probe or lora run
    (training/finetune.py)."""
    family = MODELS.get(cfg.family)
    model = model if model is not None else family.build(cfg)
    plan = finetune.plan(cfg, family)

    def init(rng):
        params = model.init(rng, *family.init_inputs(cfg))["params"]
        if part == "model":
            return params
        return plan.split(params, rng)[0 if part == "trainable" else 1]

    boxed = jax.eval_shape(init, jax.random.key(0))
    abstract = ckpt.abstract_like(nn.meta.unbox(boxed), sharding.state_shardings(boxed, mesh))
    dtype = jnp.dtype(cfg.model.param_dtype)  # float params are read in model.param_dtype
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype, sharding=a.sharding)
                        if jnp.issubdtype(a.dtype, jnp.floating) else a, abstract)


def restore_tree(directory: str, abstract, mesh: jax.sharding.Mesh, step: int | None = None, key: str = "params"):
    """(params, step) read into `abstract` (a subtree of the saved params, or all of them) from
    checkpoint `step` (None: the latest) in checkpoint directory `directory`; `key` "ema" reads
    the params' moving average instead (training/ema.py)."""
    checkpointer = ckpt.Checkpointer(directory, read_only=True)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
        with sharding.activate(mesh):
            restored, _ = checkpointer.restore({key: abstract}, step=step, partial=True)
    finally:
        checkpointer.close()
    restored = {"params": restored[key]}
    # A partial restore leaves the target's placeholders where the checkpoint has no array.
    missing = [_path(p) for p, leaf in jax.tree_util.tree_leaves_with_path(restored["params"])
               if not isinstance(leaf, jax.Array)]
    if missing:
        raise ConfigError(
            f"checkpoint step {step} in {directory} has no params at {', '.join(missing[:4])}"
            f"{' ...' if len(missing) > 4 else ''}: it was written by a different model; restore it "
            "with the config it was trained with")
    return restored["params"], step


def restore_params(directory: str, cfg: Config, mesh: jax.sharding.Mesh, step: int | None = None):
    """(params, step, meta) of a run's checkpoint `step` (None: the latest) in checkpoint
    directory `directory`, read onto `mesh`. Only the params are read. An int8- or int4-quantized
    checkpoint comes back quantized, sharded like the float params would be; a probe or lora run's comes back
    composed with the frozen params of its `init_from` run (adapters merged)."""
    meta = _meta(directory, step)
    family = MODELS.get(cfg.family)
    plan = finetune.plan(cfg, family)
    key = params_key(directory, cfg, step)
    if plan.freezes:
        trainable, step = restore_tree(directory, abstract_params(cfg, mesh, part="trainable"), mesh, step, key)
        frozen, _ = restore_tree(ckpt.checkpoint_dir(cfg.init_from), abstract_params(cfg, mesh, part="frozen"), mesh)
        return jax.jit(plan.compose)(trainable, frozen), step, meta
    abstract = abstract_params(cfg, mesh)
    record = meta.get(quantize.META_KEY)
    if record is not None and record.get("bits", 8) == 4:  # packed in the checkpoint, unpacked here
        group_size = record["group_size"]
        stored = quantize.quantized_abstract(abstract, bits=4, group_size=group_size, packed=True)
        packed, step = restore_tree(directory, stored, mesh, step, key)
        unpacked = quantize.quantized_abstract(abstract, bits=4, group_size=group_size)
        return quantize.from_checkpoint(packed, unpacked), step, meta
    if record is not None:
        abstract = quantize.quantized_abstract(abstract)
    params, step = restore_tree(directory, abstract, mesh, step, key)
    return params, step, meta


def params_key(directory: str, cfg: Config, step: int | None = None) -> str:
    """"ema" when the run keeps an EMA of its params (train.ema_decay > 0) and the checkpoint
    holds it, else "params": an EMA run is sampled, evaluated and exported with its average."""
    if not ema_lib.enabled(cfg.train.ema_decay):
        return "params"
    checkpointer = ckpt.Checkpointer(directory, read_only=True)
    try:
        return ema_lib.KEY if checkpointer.holds(ema_lib.KEY, step) else "params"
    finally:
        checkpointer.close()


def _meta(directory: str, step: int | None) -> dict:
    checkpointer = ckpt.Checkpointer(directory, read_only=True)
    try:
        return checkpointer.restore_meta(step)
    finally:
        checkpointer.close()


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def checkpoint_meta(workdir: str, step: int | None = None) -> dict:
    """The meta record (data position, config, quantization, ...) of a run's checkpoint."""
    return _meta(ckpt.checkpoint_dir(workdir), step)


def is_quantized_checkpoint(workdir: str) -> bool:
    return checkpoint_meta(workdir).get(quantize.META_KEY) is not None


def portable_config(cfg: Config) -> Config:
    """`cfg` with the computation choices this machine cannot run replaced by portable ones: a
    run trained with cuDNN attention on GPUs (or splash on TPUs) is evaluated and sampled
    elsewhere with the XLA attention, which computes the same function (the params do not depend
    on the choice)."""
    kernel_platform = {"cudnn": "gpu", "splash": "tpu"}.get(cfg.model.attention_impl)
    if kernel_platform and jax.devices()[0].platform != kernel_platform:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl="xla"))
    return cfg


def inference_config(cfg: Config, mesh: jax.sharding.Mesh) -> Config:
    """`cfg` for evaluating its params on `mesh` (sampling, quantizing, pruning): one micro-batch
    (no gradient accumulation), and a batch that the mesh's batch axes split evenly, rounded up
    from the run's own (so a run evaluates on the same batches whenever its batch size already
    divides)."""
    shards = sharding.axis_size(mesh, sharding.BATCH_AXES)
    batch_size = -(-cfg.train.batch_size // shards) * shards
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch_size, grad_accum=1))


def load_config(workdir: str) -> Config:
    """The config a run was started with (its config.json), made portable to this machine."""
    return portable_config(config_lib.from_dict(Config, config_lib.read_config_json(workdir)))


def check_mesh(cfg: Config, mesh: jax.sharding.Mesh) -> None:
    """The family's sharded dimensions (the vision tower's too, if it has one) divide over `mesh`."""
    sharding.check_divisibility(cfg, mesh, vision=MODELS.get(cfg.family).images)


def load_params(workdir: str, return_step: bool = False, tensor: int = 1, step: int | None = None) -> Any:
    """Restores the params of checkpoint `step` (default: the latest) in `workdir` onto a mesh of
    the local devices (`sharding.params_mesh_config`: heads over `tensor`). Returns (config,
    params), the config passed through `portable_config` and `inference_config`, ready to
    evaluate on that mesh (and the checkpoint's step with `return_step`)."""
    cfg = load_config(workdir)
    mesh = sharding.make_mesh(sharding.params_mesh_config(cfg.model, tensor))
    cfg = inference_config(cfg, mesh)
    validation.validate(cfg)
    check_mesh(cfg, mesh)
    params, step, _ = restore_params(ckpt.checkpoint_dir(workdir), cfg, mesh, step)
    return (cfg, params, step) if return_step else (cfg, params)
