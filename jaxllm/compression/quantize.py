"""int8 weight-only quantization of a trained param tree: symmetric, one scale per output channel.
(`python -m jaxllm.quantize` applies it to a run directory: jaxllm/cli/quantize.py.)

Which parameters are quantized is a table of (path regex, contracting axes): the attention, MLP and
MoE expert kernels. Embeddings, norms and routers match no rule and stay float. Axes count from the
end, so one rule fits a kernel whether or not it has a leading layers axis (nn.scan) or an experts
axis: `mlp/up` is [D, F], [layers, D, F] or [layers, E, D, F], contracting D in each case.

A quantized kernel replaces the float array at the same path by {"int8": values, "scale": scales}
(see `ops.dense`, which consumes it): values = round(w / scale) in [-127, 127], scale =
max|w| / 127 over the contracting axes, kept with size 1 on those axes. Exact zeros stay exact zeros,
so a pruned model stays pruned. Values are sharded like the float kernel, scales like its output axes.

Shape legend as in layers/base.py.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm.ops.projection import QUANTIZED_SCALE, QUANTIZED_VALUES

# (regex over "/"-joined param paths, contracting axes counted from the end of the kernel).
QUANTIZED_KERNELS: tuple[tuple[str, tuple[int, ...]], ...] = (
    (r"(^|/)attn/(q|k|v)$", (-3,)),  # [.., D, H|N, K]
    (r"(^|/)attn/o$", (-3, -2)),  # [.., H, K, D]
    # Dense MLPs, experts [.., E, D, F] and shared experts (mlp/shared/...).
    (r"(^|/)mlp/(.+/)?(gate|up)$", (-2,)),  # [.., D, F] and experts [.., E, D, F]
    (r"(^|/)mlp/(.+/)?down$", (-2,)),  # [.., F, D] and experts [.., E, F, D]
    # Multi-head latent attention (layers/mla.py; its q and o match the rules above).
    (r"(^|/)attn/(q_a|kv_a)$", (-2,)),  # [.., D, Q] and [.., D, C + R]
    (r"(^|/)attn/(q_b|kv_b)$", (-3,)),  # [.., Q, H, A + R] and [.., C, H, A + V]
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
    return {QUANTIZED_VALUES: values, QUANTIZED_SCALE: scale}


def dequantize_array(q):
    return q[QUANTIZED_VALUES].astype(jnp.float32) * q[QUANTIZED_SCALE]


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
            QUANTIZED_VALUES: jax.ShapeDtypeStruct(a.shape, jnp.int8, sharding=sharding),
            QUANTIZED_SCALE: jax.ShapeDtypeStruct(
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
        kernel_path = re.sub(rf"/({QUANTIZED_VALUES}|{QUANTIZED_SCALE})$", "", p)
        if contracting_axes(kernel_path, rules) is not None:
            total += leaf.size * leaf.dtype.itemsize
    return int(total)
