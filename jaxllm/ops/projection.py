"""Weight projections: `dense(x, w)` is `jnp.tensordot(x, w, contract)` for a float or an
int8/int4-quantized kernel, or a frozen kernel with a low-rank adapter (`Adapted`), with a backward pass
that picks cheap transposes.

Layers call `dense` (and the fused variants in this package) and read as plain einsums; what is
tuned for a backend lives here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxllm.sharding import target_platform

# Name of every weight-projection output, for remat policies (see models.transformer): the
# projections run inside a custom VJP, where a policy that looks for dot_general cannot see them.
PROJECTION = "projection"


@jax.custom_vjp
def _matmul_TD_DF(x_TD, w_DF):
    return x_TD @ w_DF


def _matmul_fwd(x_TD, w_DF):
    return x_TD @ w_DF, (x_TD, w_DF)


def _matmul_bwd(residuals, g_TF):
    # The weight gradient contracts over tokens, so one of x and g must be transposed. Left to
    # itself XLA:CPU transposes whichever its layout pass picks, often the wider one, and fuses
    # the elementwise backward (e.g. SiLU') into that transposing copy; both make it slow. Here we
    # transpose the narrower operand explicitly, and on CPU behind a barrier so that the copy stays
    # a plain transpose and the matmul sees row-major operands. Accelerators fold transposes into
    # their matmuls, so they get no barrier.
    x_TD, w_DF = residuals
    transposed = jax.lax.optimization_barrier if target_platform() == "cpu" else (lambda a: a)
    dx_TD = g_TF @ w_DF.T
    if x_TD.shape[1] <= g_TF.shape[1]:
        dw_DF = transposed(x_TD.T) @ g_TF
    else:
        # The barrier on the product too: otherwise XLA folds the final transpose into the matmul
        # (both operands transposed), which XLA:CPU runs on its slow generic dot path instead of a
        # YNNPACK fusion; transposing the small [F, D] result is cheap.
        dw_DF = transposed(transposed(g_TF.T) @ x_TD).T
    return dx_TD, dw_DF


_matmul_TD_DF.defvjp(_matmul_fwd, _matmul_bwd)


def project(x, w, contract: int):
    """x [..., in...] · w [in..., out...] over the last `contract` dims of x and the first of w.

    The same contraction as `jnp.tensordot(x, w, contract)`, flattened to one 2-D matmul whose
    backward pass picks cheap transposes (see `_matmul_bwd`)."""
    if target_platform() == "tpu":
        # XLA:TPU picks the transposes itself; the flattened custom VJP costs it 16 % more HBM
        # traffic per layer (llama3_8b plan: 20.8 -> 17.4 GB, 39.5 -> 38.1 ms estimated).
        return checkpoint_name(jnp.tensordot(x, w, contract), PROJECTION)
    lead, inner = x.shape[: x.ndim - contract], x.shape[x.ndim - contract:]
    out = w.shape[contract:]
    y = _matmul_TD_DF(x.reshape(-1, math.prod(inner)), w.reshape(math.prod(inner), -1))
    return checkpoint_name(y.reshape(*lead, *out), PROJECTION)


# ---------------------------------------------------------------------------------------------
# int8- and int4-quantized kernels (see jaxllm.compression.quantize)
#
# A quantized kernel is a dict {"int8": values, "scale": float32 scales} stored under the kernel's
# own parameter name. The scale keeps the kernel's rank with size 1 on the contracting axes (one
# scale per output channel), so any reshape, concatenation or stacking along output axes that is
# written without hard-coding the contracting sizes applies to values and scales alike. A plain
# dict (not a custom pytree class) is what orbax and flax handle without registration; the key
# "int8" sorts before "scale", so flax's shape check of `self.param` (which compares the first
# leaf with the initializer's shape) sees the values.
#
# An int4 kernel is {"int4": jnp.int4 values of the kernel's shape, "scale": one scale per group
# of input channels}: on the contracting axes the scale has the group count (their flattened
# size / group size, see compression.quantize.group_scale_shape), so each value's scale is the
# scale entry its index falls in along every axis. The values keep the kernel's shape (flax's
# shape check again); XLA stores int4 two per byte on GPU and TPU, checkpoints pack them into
# bytes explicitly (compression.quantize.pack_int4).
QUANTIZED_VALUES, QUANTIZED_SCALE = "int8", "scale"
INT4_VALUES = "int4"


def is_quantized(w) -> bool:
    return isinstance(w, Mapping) and (QUANTIZED_VALUES in w or INT4_VALUES in w)


def is_int4(w) -> bool:
    return isinstance(w, Mapping) and INT4_VALUES in w


def quantized_values(w):
    """The integer values of a quantized kernel (int8 or int4)."""
    return w[INT4_VALUES] if is_int4(w) else w[QUANTIZED_VALUES]


def dequantize(values, scale, dtype):
    """values · scale in `dtype`, each scale entry covering a block of values.shape // scale.shape
    (along every axis): int8's per-output-channel scales and int4's per-group ones alike."""
    blocks, scales = [], []
    for v, s in zip(values.shape, scale.shape):
        blocks += [s, v // s]
        scales += [s, 1]
    w = values.astype(jnp.float32).reshape(blocks) * scale.astype(jnp.float32).reshape(scales)
    return w.reshape(values.shape).astype(dtype)


def map_kernels(fn: Callable, *kernels):
    """`fn(*kernels)` for float kernels; for quantized ones, fn on the values and on the scales.

    `fn` must only rearrange output axes (and must not assume the contracting axes' sizes), e.g.
    `lambda a: a.reshape(a.shape[0], N, G, K)` rather than `a.reshape(D, N, G, K)`."""
    kinds = {(is_quantized(k), is_int4(k)) for k in kernels}
    if len(kinds) > 1:
        raise ValueError("cannot combine float, int8- and int4-quantized kernels in one projection")
    if is_quantized(kernels[0]):
        return {part: fn(*(k[part] for k in kernels)) for part in kernels[0]}
    return fn(*kernels)


# ---------------------------------------------------------------------------------------------
# Kernels with a low-rank adapter, applied unmerged (LoRA, see jaxllm.compression.lora)


@flax.struct.dataclass
class Adapted:
    """A frozen kernel W [batch..., in..., out...] with its adapter A [batch..., in..., r] and
    B [batch..., r, out...], which a projection applies as

        x W + scale · (dropout(x) A) B

    (Hu et al. 2021; dropout on the adapter's input, as in PEFT). It stands where the kernel
    stands in the params (the kernel is its first leaf, which is what flax's shape check of
    `self.param` compares); batch axes ("layers", "expert") lead in all three, so scans slice and
    shard_map splits them alike. `rng` is None (no dropout: evaluation, or dropout 0) or one
    dropout key per batch slice, set by the layer in training (`with_dropout_key`)."""

    kernel: jax.Array
    a: jax.Array
    b: jax.Array
    rng: jax.Array | None = None
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
    dropout_rate: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return self.a.shape[: self.a.ndim + self.b.ndim - 2 - self.kernel.ndim]

    def fold_in(self, data):
        """Itself with `data` folded into every dropout key: the shards of a batch split over
        devices each draw their own masks."""
        if self.rng is None:
            return self
        fold = lambda key: jax.random.fold_in(key, data)  # noqa: E731
        for _ in range(self.rng.ndim):
            fold = jax.vmap(fold)
        return self.replace(rng=fold(self.rng))

    def with_dropout_key(self, key):
        """Itself with dropout keyed by `key` (split into one key per batch slice)."""
        if self.dropout_rate <= 0:
            return self
        return self.replace(rng=jax.random.split(key, self.batch_shape) if self.batch_shape else key)


def dropout(x, rng, rate: float):
    """x with each element zeroed with probability `rate` and the rest scaled by 1 / (1 - rate);
    `rng` holds one key per slice of x along its leading rng.ndim axes (a single key: one mask)."""
    keep = 1.0 - rate
    shape = x.shape[rng.ndim:]
    draw = lambda key: jax.random.bernoulli(key, keep, shape)  # noqa: E731
    for _ in range(rng.ndim):
        draw = jax.vmap(draw)
    return jnp.where(draw(rng), x / keep, 0).astype(x.dtype)


def adapter_input(x, w: Adapted):
    return x if w.rng is None else dropout(x, w.rng, w.dropout_rate)


def lora_delta(x, w: Adapted, contract: int, dtype):
    """scale · (dropout(x) A) B for a kernel without batch axes: x [..., in...] -> [..., out...].
    The scale multiplies the rank-r intermediate, the narrowest tensor."""
    h = project(adapter_input(x, w).astype(dtype), w.a.astype(dtype), contract) * jnp.asarray(w.scale, dtype)
    return project(h, w.b.astype(dtype), 1)


def unadapted(w):
    """The kernel itself (an `Adapted` kernel's frozen base)."""
    return w.kernel if isinstance(w, Adapted) else w


def with_adapter(y, x, w, contract: int, dtype):
    """y, the projection of x by `unadapted(w)` (in any layout of the same elements in the same
    order, e.g. q's heads split into KV groups), plus w's adapter term if w is `Adapted`: for the
    fused projections (ops.qkv, ops.gate_up), which concatenate the kernels."""
    if not isinstance(w, Adapted):
        return y
    return y + lora_delta(x, w, contract, dtype).reshape(y.shape)


def dense(x, w, contract: int, dtype, names: tuple | None = None):
    """`jnp.tensordot(x, w, contract)` in `dtype` for a float or int8/int4-quantized kernel `w`, plus
    the adapter's term for an `Adapted` one; `names` are the logical names of w's axes to
    constrain it to (None: no constraint).

    A quantized kernel is converted to `dtype` inside the computation (no float copy outlives the
    call) and its per-output-channel scale multiplies the matmul's output, which is the same as
    scaling the kernel since the scale is constant along the contracted axes. The int8 values are
    constrained before the conversion, so resharding moves a quarter of the float bytes. An int4
    kernel's per-group scales multiply the kernel as it is converted (`dequantize`)."""
    if isinstance(w, Adapted):
        return dense(x, w.kernel, contract, dtype, names) + lora_delta(x, w, contract, dtype)
    if not is_quantized(w):
        kernel = w.astype(dtype)
        return project(x.astype(dtype), kernel if names is None else nn.with_logical_constraint(kernel, names),
                       contract)
    values = quantized_values(w)
    if names is not None:
        values = nn.with_logical_constraint(values, names)
    # Tied to x, the conversion runs just before its matmul. Otherwise XLA hoists every layer's
    # conversion (it depends on the params alone) to the start of the step, so all the float
    # copies are live at once and have left the cache by the time their matmul reads them.
    x, values = jax.lax.optimization_barrier((x, values))
    if is_int4(w):  # per-group scales vary along the contracted axes: scale the kernel
        return project(x.astype(dtype), dequantize(values, w[QUANTIZED_SCALE], dtype), contract)
    y = project(x.astype(dtype), values.astype(dtype), contract)
    scale = w[QUANTIZED_SCALE].reshape(values.shape[contract:]).astype(dtype)
    return y * scale


def einsum(spec: str, x, w):
    """`jnp.einsum(spec, x, w)` for a float or int8-quantized `w` whose scale broadcasts against
    the output (per-output-channel scales laid out like the output's trailing axes), an int4 one
    (dequantized first), or an `Adapted` one whose batch axes (those of w's letters also in x and
    the output, e.g. e in "ecd,edf->ecf") lead in x."""
    if isinstance(w, Adapted):
        return einsum(spec, x, w.kernel) + _lora_einsum(spec, x, w)
    if is_int4(w):
        return jax.numpy.einsum(spec, x, dequantize(w[INT4_VALUES], w[QUANTIZED_SCALE], x.dtype))
    if is_quantized(w):
        y = jax.numpy.einsum(spec, x, w[QUANTIZED_VALUES].astype(x.dtype))
        return y * w[QUANTIZED_SCALE].astype(x.dtype)
    return jax.numpy.einsum(spec, x, w.astype(x.dtype))


def _lora_einsum(spec: str, x, w: Adapted):
    """scale · (dropout(x) A) B as two einsums: A's letters are w's batch and contracted ones plus
    a rank letter, B's its batch ones, the rank letter and its output ones."""
    inputs, out = spec.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    batch = "".join(c for c in ws if c in xs and c in out)
    contracted = "".join(c for c in ws if c in xs and c not in out)
    outs = "".join(c for c in ws if c not in xs)
    r = next(c for c in "rstuvwxyzabcdefghijklmnopq" if c not in spec)
    h_spec = "".join(c for c in out if c not in outs) + r
    h = jax.numpy.einsum(f"{xs},{batch}{contracted}{r}->{h_spec}", adapter_input(x, w), w.a.astype(x.dtype))
    return jax.numpy.einsum(f"{h_spec},{batch}{r}{outs}->{out}", h * jnp.asarray(w.scale, x.dtype), w.b.astype(x.dtype))
