"""Grouped SwiGLU: each row through its own expert's SwiGLU, the core of dropless MoE.

Three registered implementations of one function (rows whose group is >= E give zeros):
`blocked` (rows padded to per-expert blocks; fast on XLA:CPU, which lowers ragged_dot densely),
`ragged_dot` (jax.lax.ragged_dot over sorted rows; GPU/TPU) and `dense` (every expert on every
row; the reference). `grouped_swiglu("auto")` picks by backend.

Shape legend: R rows, D model width, F expert width, E experts, C rows per expert, N blocks,
S block size.

An expert kernel is a float array or an int8-quantized one ({"int8": values, "scale": scales}, see
ops.dense): the values enter the matmul in the compute dtype and the per-output-channel scale
(shape [E, 1, F]) multiplies its output, so no float copy of the weights is made; an int4 one's
per-group scales multiply the kernel as it is converted. It may also be
an adapted kernel (ops.projection.Adapted, LoRA), one adapter per expert, applied unmerged.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.ops.projection import (INT4_VALUES, QUANTIZED_SCALE, QUANTIZED_VALUES, Adapted, dequantize, dropout, einsum,
                                   is_int4, is_quantized)
from jaxllm.registry import Registry
from jaxllm.sharding import target_platform


def _take_experts(w, index):
    taken = jax.tree.map(lambda a: a[index], w)
    if isinstance(taken, Adapted) and taken.rng is not None:  # each block its own dropout mask
        taken = taken.replace(rng=jax.vmap(jax.random.fold_in)(taken.rng, jnp.arange(index.shape[0])))
    return taken


def swiglu_ECD(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Expert e's SwiGLU on its C rows: (silu(x W_gate[e]) * x W_up[e]) W_down[e]."""
    h_ECF = nn.silu(einsum("ecd,edf->ecf", x_ECD, w_gate_EDF)) * einsum("ecd,edf->ecf", x_ECD, w_up_EDF)
    return einsum("ecf,efd->ecd", h_ECF, w_down_EFD)


def rank_within_group(group_R, num_groups: int):
    """Each row's rank among the rows of its group (stable), and the group sizes.

    Rows with group >= num_groups (invalid) get meaningless ranks and are not counted."""
    order_R = jnp.argsort(group_R, stable=True)
    sizes_G = jax.ops.segment_sum(jnp.ones_like(group_R), group_R, num_segments=num_groups)
    starts_G = jnp.cumsum(sizes_G) - sizes_G
    sorted_group_R = group_R[order_R]
    rank_sorted_R = jnp.arange(group_R.shape[0]) - starts_G[jnp.minimum(sorted_group_R, num_groups - 1)]
    rank_R = jnp.zeros_like(group_R).at[order_R].set(rank_sorted_R)
    return rank_R, sizes_G


def block_size(rows: int, groups: int) -> int:
    # Each group wastes under one block of padding: blocks of ~rows/(4·groups) keep the waste
    # under a quarter of the work, capped at 256 rows where the matmuls are already efficient.
    target = max(rows // (4 * groups), 1)
    return int(min(256, max(8, 2 ** int(math.log2(target)))))


GROUPED_FFNS = Registry("model.moe.grouped_matmul")


@GROUPED_FFNS.register("blocked")
def grouped_swiglu_blocked(x_RD, group_R, w_gate_EDF, w_up_EDF, w_down_EFD):
    """SwiGLU of each row with its group's expert; rows with group >= E give zeros.

    XLA:CPU lowers ragged_dot densely (every expert on every row), so rows are placed, grouped, into
    a buffer padded to whole blocks of S rows, each block multiplies one expert's weights, and the
    results are read back: one extra gather and scatter against E-fold less matmul work."""
    E = jax.tree.leaves(w_gate_EDF)[0].shape[0]
    R, D = x_RD.shape
    S = block_size(R, E)
    N = -(-R // S) + E  # worst case: every group's last block is partly empty
    rank_R, sizes_E = rank_within_group(group_R, E)
    padded_E = -(-sizes_E // S) * S
    padded_end_E = jnp.cumsum(padded_E)
    valid_R = group_R < E
    dest_R = jnp.where(valid_R, padded_end_E[jnp.minimum(group_R, E - 1)]
                       - padded_E[jnp.minimum(group_R, E - 1)] + rank_R, N * S)
    buffer_ND = jnp.zeros((N * S, D), x_RD.dtype).at[dest_R].set(x_RD, mode="drop")
    expert_N = jnp.minimum(jnp.searchsorted(padded_end_E, jnp.arange(N) * S, side="right"), E - 1)
    # Empty trailing blocks hold zeros, and SwiGLU(0) = 0, so their expert does not matter.
    out_NSD = swiglu_ECD(buffer_ND.reshape(N, S, D), *(_take_experts(w, expert_N)
                                                       for w in (w_gate_EDF, w_up_EDF, w_down_EFD)))
    return out_NSD.reshape(N * S, D).at[dest_R].get(mode="fill", fill_value=0)


def _ragged_dot(x_RD, w_EDF, sizes_E, expert_sorted_R):
    if isinstance(w_EDF, Adapted):  # x W + scale · (dropout(x) A) B, a dropout key per row
        R = x_RD.shape[0]
        x_in = x_RD if w_EDF.rng is None else dropout(
            x_RD, jax.vmap(jax.random.fold_in)(w_EDF.rng[expert_sorted_R], jnp.arange(R)), w_EDF.dropout_rate)
        h = jax.lax.ragged_dot(x_in, w_EDF.a.astype(x_RD.dtype), sizes_E) * jnp.asarray(w_EDF.scale, x_RD.dtype)
        return (_ragged_dot(x_RD, w_EDF.kernel, sizes_E, expert_sorted_R)
                + jax.lax.ragged_dot(h, w_EDF.b.astype(x_RD.dtype), sizes_E))
    if is_int4(w_EDF):  # per-group scales vary along D: scale the kernel
        return jax.lax.ragged_dot(x_RD, dequantize(w_EDF[INT4_VALUES], w_EDF[QUANTIZED_SCALE], x_RD.dtype), sizes_E)
    if is_quantized(w_EDF):
        y = jax.lax.ragged_dot(x_RD, w_EDF[QUANTIZED_VALUES].astype(x_RD.dtype), sizes_E)
        return y * w_EDF[QUANTIZED_SCALE][expert_sorted_R, 0].astype(x_RD.dtype)
    return jax.lax.ragged_dot(x_RD, w_EDF.astype(x_RD.dtype), sizes_E)


@GROUPED_FFNS.register("ragged_dot")
def grouped_swiglu_ragged(x_RD, group_R, w_gate_EDF, w_up_EDF, w_down_EFD):
    """The same with jax.lax.ragged_dot over rows sorted by group (GPU/TPU)."""
    E = jax.tree.leaves(w_gate_EDF)[0].shape[0]
    order_R = jnp.argsort(group_R, stable=True)
    sizes_E = jax.ops.segment_sum(jnp.ones_like(group_R), group_R, num_segments=E)
    group_sorted_R = jnp.minimum(group_R[order_R], E - 1)
    x_sorted_RD = jnp.where((group_R < E)[order_R, None], x_RD[order_R], 0)
    h_RF = nn.silu(_ragged_dot(x_sorted_RD, w_gate_EDF, sizes_E, group_sorted_R)) * _ragged_dot(
        x_sorted_RD, w_up_EDF, sizes_E, group_sorted_R)
    out_sorted_RD = _ragged_dot(h_RF, w_down_EFD, sizes_E, group_sorted_R)
    return jnp.zeros_like(x_RD).at[order_R].set(out_sorted_RD)


@GROUPED_FFNS.register("dense")
def grouped_swiglu_dense(x_RD, group_R, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Every expert on every row, then the row's own result kept (the naive baseline)."""
    E = jax.tree.leaves(w_gate_EDF)[0].shape[0]
    out_ERD = swiglu_ECD(jnp.broadcast_to(x_RD, (E, *x_RD.shape)), w_gate_EDF, w_up_EDF, w_down_EFD)
    return jnp.einsum("re,erd->rd", jax.nn.one_hot(group_R, E, dtype=x_RD.dtype), out_ERD)


def grouped_swiglu(kind: str):
    """The registered grouped SwiGLU `kind`; "auto" is ragged_dot on GPU/TPU, blocked elsewhere."""
    if kind == "auto":
        kind = "ragged_dot" if target_platform() in ("gpu", "tpu") else "blocked"
    return GROUPED_FFNS.get(kind)
