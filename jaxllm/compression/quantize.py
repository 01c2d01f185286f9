"""int8 and int4 weight-only quantization of a trained param tree: symmetric, int8 with one scale
per output channel, int4 with one per group of input channels of each output channel.
(`python -m jaxllm.quantize` applies it to a run directory: jaxllm/cli/quantize.py.)

Which parameters are quantized is a table of (path regex, contracting axes): the attention, MLP and
MoE expert kernels. Embeddings, norms and routers match no rule and stay float. Axes count from the
end, so one rule fits a kernel whether or not it has a leading layers axis (nn.scan) or an experts
axis: `mlp/up` is [D, F], [layers, D, F] or [layers, E, D, F], contracting D in each case.

A quantized kernel replaces the float array at the same path by {"int8": values, "scale": scales}
(see `ops.dense`, which consumes it): values = round(w / scale) in [-127, 127], scale =
max|w| / 127 over the contracting axes, kept with size 1 on those axes. Exact zeros stay exact zeros,
so a pruned model stays pruned. Values are sharded like the float kernel, scales like its output axes.

int4 (`bits=4`) replaces it by {"int4": values, "scale": scales}: values = round(w / scale) in
[-7, 7] as jnp.int4, scale = max|w| / 7 over each group of `group_size` consecutive input channels
(the contracting axes flattened, as a Linear's in_features), laid out with the group count on the
contracting axes (`group_scale_shape`). In memory the values keep the kernel's shape (see
ops.projection); in the checkpoint they are packed two per byte along the last contracting axis
(`pack_int4`, `to_checkpoint` / `from_checkpoint`).

Shape legend as in layers/base.py.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm.ops.projection import INT4_VALUES, QUANTIZED_SCALE, QUANTIZED_VALUES, dequantize, is_int4, is_quantized

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
INT4_MAX = 7
FORMAT_INT4 = "int4 symmetric per group of input channels, weight-only, two per byte"
DEFAULT_GROUP_SIZE = 128


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
    if is_int4(q):
        return dequantize(q[INT4_VALUES], q[QUANTIZED_SCALE], jnp.float32)
    return q[QUANTIZED_VALUES].astype(jnp.float32) * q[QUANTIZED_SCALE]


def group_scale_shape(shape: Sequence[int], axes: Sequence[int], group_size: int, path: str = "kernel"):
    """The int4 scale's shape for a kernel of `shape`: groups of `group_size` consecutive input
    channels of the contracting axes flattened (row-major), the group count factored onto those
    axes from the last, so that the scale of value i along each axis is entry i // (size / count).
    A group size that does not tile the contracting axes raises QuantizationError."""
    ndim = len(shape)
    contracted = sorted(a % ndim for a in axes)
    out, remaining = list(shape), max(group_size, 0)
    for a in reversed(contracted if group_size >= 1 else []):
        if remaining >= shape[a] and remaining % shape[a] == 0:  # a group spans this whole axis
            out[a], remaining = 1, remaining // shape[a]
        elif shape[a] % remaining == 0:  # this axis holds whole groups
            out[a], remaining = shape[a] // remaining, 1
        else:
            break
    if remaining != 1 or group_size < 1:
        inputs = tuple(shape[a] for a in contracted)
        raise QuantizationError(f"--group_size {group_size} does not divide the input dimension "
                                f"{math.prod(inputs)} {inputs} of {path}; choose a group size that divides it")
    return tuple(out)


def quantize_array_int4(w, axes: Sequence[int], group_size: int = DEFAULT_GROUP_SIZE):
    """{"int4": values, "scale": float32 scales} of float array `w`, one scale per group of
    `group_size` input channels per output channel. |dequantized - w| <= scale / 2 element-wise."""
    w = jnp.asarray(w, jnp.float32)
    scale_shape = group_scale_shape(w.shape, axes, group_size)
    blocks = [d for s, v in zip(scale_shape, w.shape) for d in (s, v // s)]
    w_blocks = w.reshape(blocks)
    amax = jnp.max(jnp.abs(w_blocks), axis=tuple(range(1, len(blocks), 2)), keepdims=True)
    scale = jnp.where(amax > 0, amax / INT4_MAX, 1.0).astype(jnp.float32)
    values = jnp.clip(jnp.round(w_blocks / scale), -INT4_MAX, INT4_MAX).reshape(w.shape).astype(jnp.int4)
    return {INT4_VALUES: values, QUANTIZED_SCALE: scale.reshape(scale_shape)}


def pack_int4(values, axis: int):
    """uint8 array holding int4 `values` two per byte along `axis` (even index in the low nibble,
    odd in the high one); that axis halves. Its size must be even."""
    v = jnp.moveaxis(jnp.asarray(values).astype(jnp.int8), axis, -1)
    if v.shape[-1] % 2:
        raise QuantizationError(f"cannot pack int4 values two per byte along an axis of odd size {v.shape[-1]}")
    pairs = v.reshape(*v.shape[:-1], -1, 2).astype(jnp.uint8) & 0xF
    return jnp.moveaxis(pairs[..., 0] | (pairs[..., 1] << 4), -1, axis)


def unpack_int4(packed, axis: int):
    """The jnp.int4 values `pack_int4` packed along `axis`."""
    p = jnp.moveaxis(jnp.asarray(packed, jnp.uint8), axis, -1)
    nibbles = jnp.stack([p & 0xF, p >> 4], axis=-1).astype(jnp.int8)
    signed = (nibbles ^ 8) - 8  # 4-bit two's complement: 8..15 are -8..-1
    return jnp.moveaxis(signed.reshape(*p.shape[:-1], -1), -1, axis).astype(jnp.int4)


def is_quantized_tree(params) -> bool:
    return any(getattr(x, "dtype", None) in (jnp.int8, jnp.int4) for x in jax.tree.leaves(params))


def _map_kernels(fn_kernel, fn_other, params, rules, with_path: bool = False):
    """Rebuilds `params` with fn_kernel(leaf, axes) (and the path, `with_path`) at quantizable
    paths, fn_other(leaf) elsewhere."""
    def visit(path, leaf):
        axes = contracting_axes(_path_str(path), rules)
        if axes is None:
            return fn_other(leaf)
        if len(leaf.shape) < len(axes) + 1:
            raise QuantizationError(
                f"{_path_str(path)} has shape {leaf.shape}, too few axes for contracting axes {axes}"
            )
        return fn_kernel(leaf, axes, _path_str(path)) if with_path else fn_kernel(leaf, axes)
    return jax.tree_util.tree_map_with_path(visit, params)


def _scale_sharding(sharding, ndim: int, axes: Sequence[int]):
    """The kernel's sharding with the contracting axes unsharded (they have size 1 in the scale,
    or an int4 group count that need not divide the mesh)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    for a in axes:
        spec[a] = None
    return NamedSharding(sharding.mesh, P(*spec))


def _halved_sharding(sharding, ndim: int, axis: int, size: int):
    """The kernel's sharding for its packed values (`axis` halved to `size`): the same, unless
    the halved axis no longer divides over its mesh axes (then that axis is unsharded)."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    names = spec[axis] if isinstance(spec[axis], tuple) else (spec[axis],)
    if size % math.prod(sharding.mesh.shape[n] for n in names if n is not None):
        spec[axis] = None
    return NamedSharding(sharding.mesh, P(*spec))


def packed_axis(ndim: int, axes: Sequence[int]) -> int:
    """The axis a checkpoint packs int4 values along: the last contracting one."""
    return max(a % ndim for a in axes)


def quantized_abstract(abstract_params, rules=QUANTIZED_KERNELS, bits: int = 8,
                       group_size: int = DEFAULT_GROUP_SIZE, packed: bool = False):
    """ShapeDtypeStructs (with shardings) of the quantized tree of float `abstract_params`: what a
    quantized checkpoint is restored into (int4 `packed`: as the checkpoint holds it)."""
    def kernel(a, axes, path="kernel"):
        sharding = getattr(a, "sharding", None)
        if bits == 4:
            scale_shape = group_scale_shape(a.shape, axes, group_size, path)
        else:
            contracted = {ax % a.ndim for ax in axes}
            scale_shape = tuple(1 if i in contracted else d for i, d in enumerate(a.shape))
        scale = jax.ShapeDtypeStruct(
            scale_shape, jnp.float32, sharding=None if sharding is None else _scale_sharding(sharding, a.ndim, axes))
        if bits == 8:
            return {QUANTIZED_VALUES: jax.ShapeDtypeStruct(a.shape, jnp.int8, sharding=sharding), QUANTIZED_SCALE: scale}
        if not packed:
            return {INT4_VALUES: jax.ShapeDtypeStruct(a.shape, jnp.int4, sharding=sharding), QUANTIZED_SCALE: scale}
        axis = packed_axis(a.ndim, axes)
        if a.shape[axis] % 2:
            raise QuantizationError(f"{path} has shape {a.shape}: int4 packs two per byte along axis {axis}, "
                                    "whose size is odd")
        shape = tuple(d // 2 if i == axis else d for i, d in enumerate(a.shape))
        return {INT4_VALUES: jax.ShapeDtypeStruct(
            shape, jnp.uint8, sharding=None if sharding is None else _halved_sharding(sharding, a.ndim, axis, shape[axis])),
            QUANTIZED_SCALE: scale}
    if bits not in (4, 8):
        raise QuantizationError(f"--bits {bits} must be 8 or 4")
    return _map_kernels(kernel, lambda a: a, abstract_params, rules, with_path=True)


def _shardings(target):
    shardings = jax.tree.map(lambda a: a.sharding, target)
    return None if any(s is None for s in jax.tree.leaves(shardings, is_leaf=lambda s: s is None)) else shardings


def quantize_params(params, rules=QUANTIZED_KERNELS, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE):
    """The quantized tree (int8, or int4 with `group_size`) of a float param tree, sharded like it
    (values like the kernel, scales like its output axes). Raises QuantizationError if `params` is
    already quantized or a group size does not fit a kernel."""
    if is_quantized_tree(params):
        raise QuantizationError("the params are already quantized; quantize the float checkpoint")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), params
    )
    target = quantized_abstract(abstract, rules, bits, group_size)  # checks every group size first
    if bits == 4:
        quantize_kernel = lambda w, axes: quantize_array_int4(w, axes, group_size)  # noqa: E731
    else:
        quantize_kernel = quantize_array
    fn = jax.jit(lambda p: _map_kernels(quantize_kernel, lambda x: x, p, rules), out_shardings=_shardings(target))
    return fn(params)


def _map_int4(fn, params, rules):
    """`params` with fn(kernel, contracting axes) in place of each int4 kernel."""
    def visit(path, leaf):
        if not is_int4(leaf):
            return leaf
        return fn(leaf, contracting_axes(_path_str(path), rules))
    return jax.tree_util.tree_map_with_path(visit, params, is_leaf=is_quantized)


def to_checkpoint(params, rules=QUANTIZED_KERNELS):
    """`params` as a checkpoint stores them: int4 values packed two per byte (`pack_int4`)."""
    def pack(w, axes):
        return {**w, INT4_VALUES: pack_int4(w[INT4_VALUES], packed_axis(w[INT4_VALUES].ndim, axes))}
    return jax.jit(lambda p: _map_int4(pack, p, rules))(params)


def from_checkpoint(params, abstract, rules=QUANTIZED_KERNELS):
    """Restored checkpoint `params` unpacked into the in-memory tree `abstract` describes
    (`quantized_abstract(..., bits=4)`), sharded as it says."""
    def unpack(w, axes):
        return {**w, INT4_VALUES: unpack_int4(w[INT4_VALUES], packed_axis(w[INT4_VALUES].ndim, axes))}
    return jax.jit(lambda p: _map_int4(unpack, p, rules), out_shardings=_shardings(abstract))(params)


def _nbytes(x) -> float:
    bits = jnp.iinfo(x.dtype).bits if jnp.issubdtype(x.dtype, jnp.integer) else 8 * x.dtype.itemsize
    return x.size * bits / 8


def weight_bytes(params) -> int:
    """Bytes of the params as stored (int4 values at two per byte)."""
    return int(sum(_nbytes(x) for x in jax.tree.leaves(params)))


def kernel_bytes(params, rules=QUANTIZED_KERNELS) -> int:
    """Bytes of the quantizable kernels only (values plus scales when quantized; int4 values at
    two per byte)."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        p = _path_str(path)
        kernel_path = re.sub(rf"/({QUANTIZED_VALUES}|{INT4_VALUES}|{QUANTIZED_SCALE})$", "", p)
        if contracting_axes(kernel_path, rules) is not None:
            total += _nbytes(leaf)
    return int(total)
