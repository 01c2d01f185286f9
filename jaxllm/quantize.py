"""int8 weight-only quantization of a trained param tree: symmetric, one scale per output channel.

    python -m jaxllm.quantize --workdir runs/tiny_lm --out runs/tiny_lm_int8 [--eval_batches 4]

Which parameters are quantized is a table of (path regex, contracting axes): the attention, MLP and
MoE expert kernels. Embeddings, norms and routers match no rule and stay float. Axes count from the
end, so one rule fits a kernel whether or not it has a leading layers axis (nn.scan) or an experts
axis: `mlp/up` is [D, F], [layers, D, F] or [layers, E, D, F], contracting D in each case.

A quantized kernel replaces the float array at the same path by {"int8": values, "scale": scales}
(see `layers.project_kernel`, which consumes it): values = round(w / scale) in [-127, 127], scale =
max|w| / 127 over the contracting axes, kept with size 1 on those axes. Exact zeros stay exact zeros,
so a pruned model stays pruned. Values are sharded like the float kernel, scales like its output axes.

Shape legend as in layers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm import layers

# (regex over "/"-joined param paths, contracting axes counted from the end of the kernel).
QUANTIZED_KERNELS: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"(^|/)attn/(q|k|v)$", (-3,)),  # [.., D, H|N, K]
    (r"(^|/)attn/o$", (-3, -2)),  # [.., H, K, D]
    # Dense MLPs, experts [.., E, D, F] and shared experts (mlp/shared/...).
    (r"(^|/)mlp/(.+/)?(gate|up)$", (-2,)),  # [.., D, F] and experts [.., E, D, F]
    (r"(^|/)mlp/(.+/)?down$", (-2,)),  # [.., F, D] and experts [.., E, F, D]
)

INT8_MAX = 127
# Written into the quantized checkpoint's meta; its presence is how loaders recognise one.
META_KEY = "quantization"
FORMAT = "int8 symmetric per output channel, weight-only"


class QuantizationError(ValueError):
    """The input cannot be quantized (or loaded as quantized); the message says why."""


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def contracting_axes(path: str, rules=QUANTIZED_KERNELS) -> tuple[int, ...] | None:
    """The contracting axes of the kernel at `path`, or None when it is not quantized."""
    for pattern, axes in rules:
        if re.search(pattern, path):
            return axes
    return None


def quantize_array(w, axes: Sequence[int]):
    """{"int8": values, "scale": float32 scales} of float array `w`, one scale per slice along
    the non-contracting axes. |dequantized - w| <= scale / 2 element-wise."""
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=tuple(axes), keepdims=True)
    # An all-zero channel (e.g. fully pruned) gets scale 1 rather than 0 so the division is
    # defined; its values are 0 either way.
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0).astype(jnp.float32)
    values = jnp.clip(jnp.round(w / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return {layers.QUANTIZED_VALUES: values, layers.QUANTIZED_SCALE: scale}


def dequantize_array(q):
    return q[layers.QUANTIZED_VALUES].astype(jnp.float32) * q[layers.QUANTIZED_SCALE]


def is_quantized_tree(params) -> bool:
    return any(getattr(x, "dtype", None) == jnp.int8 for x in jax.tree.leaves(params))


def _map_kernels(fn_kernel, fn_other, params, rules):
    """Rebuilds `params` with fn_kernel(leaf, axes) at quantizable paths, fn_other(leaf) elsewhere."""
    def visit(path, leaf):
        axes = contracting_axes(_path_str(path), rules)
        if axes is None:
            return fn_other(leaf)
        if len(leaf.shape) < len(axes) + 1:
            raise QuantizationError(
                f"{_path_str(path)} has shape {leaf.shape}, too few axes for contracting axes {axes}"
            )
        return fn_kernel(leaf, axes)
    return jax.tree_util.tree_map_with_path(visit, params)


def _scale_sharding(sharding, ndim: int, axes: Sequence[int]):
    """The kernel's sharding with the contracting axes unsharded (they have size 1 in the scale)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    for a in axes:
        spec[a] = None
    return NamedSharding(sharding.mesh, P(*spec))


def quantized_abstract(abstract_params, rules=QUANTIZED_KERNELS):
    """ShapeDtypeStructs (with shardings) of the quantized tree of float `abstract_params`: what a
    quantized checkpoint is restored into."""
    def kernel(a, axes):
        sharding = getattr(a, "sharding", None)
        contracted = {ax % a.ndim for ax in axes}
        scale_shape = tuple(1 if i in contracted else d for i, d in enumerate(a.shape))
        return {
            layers.QUANTIZED_VALUES: jax.ShapeDtypeStruct(a.shape, jnp.int8, sharding=sharding),
            layers.QUANTIZED_SCALE: jax.ShapeDtypeStruct(
                scale_shape, jnp.float32,
                sharding=None if sharding is None else _scale_sharding(sharding, a.ndim, axes),
            ),
        }
    return _map_kernels(kernel, lambda a: a, abstract_params, rules)


def quantize_params(params, rules=QUANTIZED_KERNELS):
    """The quantized tree of a float param tree, sharded like it (values like the kernel, scales
    like its output axes). Raises QuantizationError if `params` is already quantized."""
    if is_quantized_tree(params):
        raise QuantizationError("the params are already int8-quantized; quantize the float checkpoint")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), params
    )
    target = quantized_abstract(abstract, rules)
    out_shardings = jax.tree.map(lambda a: a.sharding, target)
    if any(s is None for s in jax.tree.leaves(out_shardings, is_leaf=lambda s: s is None)):
        out_shardings = None
    fn = jax.jit(lambda p: _map_kernels(quantize_array, lambda x: x, p, rules),
                 out_shardings=out_shardings)
    return fn(params)


def weight_bytes(params) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))


def kernel_bytes(params, rules=QUANTIZED_KERNELS) -> int:
    """Bytes of the quantizable kernels only (values plus scales when quantized)."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        p = _path_str(path)
        kernel_path = re.sub(rf"/({layers.QUANTIZED_VALUES}|{layers.QUANTIZED_SCALE})$", "", p)
        if contracting_axes(kernel_path, rules) is not None:
            total += leaf.size * leaf.dtype.itemsize
    return int(total)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def checkpoint_quantization(workdir: str) -> dict | None:
    """The quantization record of the latest checkpoint in `workdir` (None for a float one)."""
    from jaxllm import checkpoint as ckpt

    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir), read_only=True)
    try:
        return checkpointer.restore_meta().get(META_KEY)
    finally:
        checkpointer.close()


def quantize_workdir(workdir: str, out: str) -> dict:
    """Writes the int8 version of `workdir`'s latest params to a new run directory `out`
    (config.json plus a params-only checkpoint at the same step). Returns its meta."""
    from jaxllm import checkpoint as ckpt
    from jaxllm import config as config_lib, generate

    if os.path.abspath(out) == os.path.abspath(workdir):
        raise QuantizationError("--out must differ from --workdir (the float checkpoint is kept)")
    if ckpt.holds_checkpoints(out):
        raise QuantizationError(f"{out} already holds checkpoints; choose an empty --out")
    ckpt.read_config_json(workdir)  # a clear error if workdir is not a run directory
    if checkpoint_quantization(workdir) is not None:
        raise QuantizationError(f"{workdir} already holds an int8-quantized checkpoint")
    cfg, params, step = generate.load_params(workdir, return_step=True)
    quantized = quantize_params(params)
    meta = {
        "data_step": step,
        "config": config_lib.to_dict(cfg),
        META_KEY: {"format": FORMAT, "source": os.path.abspath(workdir),
                   "rules": [[p, list(a)] for p, a in QUANTIZED_KERNELS]},
    }
    os.makedirs(out, exist_ok=True)
    shutil.copyfile(os.path.join(workdir, "config.json"), os.path.join(out, "config.json"))
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(out))
    try:
        checkpointer.save(step, {"params": quantized}, meta)
    finally:
        checkpointer.close()
    return meta


def evaluate_workdir(workdir: str, num_batches: int) -> dict:
    """Validation loss of `workdir`'s latest params (float or quantized) on its config's data."""
    from jaxllm import data, generate, train

    cfg, params = generate.load_params(workdir)
    s = train.setup(cfg, jax.tree.leaves(params)[0].sharding.mesh)
    eval_step = train.make_eval_step(s, param_shardings=jax.tree.map(lambda x: x.sharding, params))
    return train.evaluate(s, eval_step, params, data.eval_batches(cfg), num_batches)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="int8-quantize a jaxllm checkpoint.")
    parser.add_argument("--workdir", required=True, help="run directory with a float checkpoint")
    parser.add_argument("--out", required=True, help="new run directory for the int8 checkpoint")
    parser.add_argument("--eval_batches", type=int, default=0,
                        help="also report validation loss, float vs int8, over this many batches")
    args = parser.parse_args(argv)
    if args.eval_batches < 0:
        parser.error(f"--eval_batches {args.eval_batches} must be 0 (no evaluation) or more")
    from jaxllm import generate
    from jaxllm.config import ConfigError

    try:
        quantize_workdir(args.workdir, args.out)
        _, float_params = generate.load_params(args.workdir)
        _, int8_params = generate.load_params(args.out)
        report = {"out": os.path.abspath(args.out),
                  "weight_bytes_float": weight_bytes(float_params),
                  "weight_bytes_int8": weight_bytes(int8_params),
                  "kernel_bytes_float": kernel_bytes(float_params),
                  "kernel_bytes_int8": kernel_bytes(int8_params)}
        if args.eval_batches:
            report["eval_loss_float"] = evaluate_workdir(args.workdir, args.eval_batches)["eval_loss"]
            report["eval_loss_int8"] = evaluate_workdir(args.out, args.eval_batches)["eval_loss"]
    except (FileNotFoundError, QuantizationError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
