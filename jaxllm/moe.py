"""Mixture-of-experts MLP: float32 top-k router, capacity or dropless dispatch, SwiGLU experts,
optional shared experts, load-balancing and z losses, and expert parallelism with `jax.shard_map`.

Shape legend: B batch, L length, D model width, F expert width, E experts, K top-k,
T tokens (B*L, local to a shard inside shard_map), R routed token copies (T*K), C capacity per
expert, N blocks of the blocked grouped matmul, S block size, X expert-axis size (devices),
W rows per destination device in the dropless exchange.

Parameters (under the block's `mlp`): router [D, E], gate [E, D, F], up [E, D, F], down [E, F, D],
and `shared` (a layers.Mlp) when shared experts are enabled.

Whenever a mesh with more than one batch shard is active, the layer runs inside `shard_map`: every
shard routes its own tokens (capacity is per shard, as in GShard's groups), token copies travel to
the device holding their expert with `all_to_all` over `expert`, and come back the same way. Losses
and metrics are reduced over all shards, so they equal the single-device values.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm import layers
from jaxllm.config import ModelConfig, MoeConfig

BATCH_AXES = ("data", "fsdp", "expert")  # as sharding.BATCH_AXES (not imported: no cycle)


# ---------------------------------------------------------------------------------------------
# Router


def route(logits_TE, moe: MoeConfig):
    """Returns (expert ids [T, K], combine weights [T, K], full softmax [T, E])."""
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    if moe.router == "softmax_topk":
        weights_TK, experts_TK = jax.lax.top_k(probs_TE, moe.top_k)
        if moe.renormalize:
            weights_TK = weights_TK / jnp.sum(weights_TK, axis=-1, keepdims=True)
    elif moe.router == "topk_softmax":
        top_logits_TK, experts_TK = jax.lax.top_k(logits_TE, moe.top_k)
        weights_TK = jax.nn.softmax(top_logits_TK, axis=-1)
    else:
        raise ValueError(f"unknown model.moe.router {moe.router!r}; choose softmax_topk or topk_softmax")
    return experts_TK, weights_TK, probs_TE


def router_sums(logits_TE, probs_TE, experts_TK, num_experts: int):
    """Per-shard sums from which the losses and metrics are formed once all shards are added up."""
    counts_E = jnp.sum(jax.nn.one_hot(experts_TK, num_experts, dtype=jnp.float32), axis=(0, 1))
    entropy_T = -jnp.sum(probs_TE * jnp.log(jnp.maximum(probs_TE, 1e-30)), axis=-1)
    return {
        "counts_E": counts_E,
        "prob_sum_E": jnp.sum(probs_TE, axis=0),
        "z_sum": jnp.sum(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1))),
        "entropy_sum": jnp.sum(entropy_T),
        "tokens": jnp.asarray(logits_TE.shape[0], jnp.float32),
    }


def losses_and_metrics(sums, dropped, num_experts: int, top_k: int):
    """Switch load-balancing loss E·Σ f_i·P_i (1.0 under uniform routing), z-loss and metrics."""
    copies = sums["tokens"] * top_k
    fraction_E = sums["counts_E"] / copies
    mean_prob_E = sums["prob_sum_E"] / sums["tokens"]
    aux = num_experts * jnp.sum(fraction_E * mean_prob_E)
    z = sums["z_sum"] / sums["tokens"]
    metrics = {
        "aux_loss": aux,
        "z_loss": z,
        "expert_fraction_max": jnp.max(fraction_E),
        "expert_fraction_min": jnp.min(fraction_E),
        "dropped_fraction": dropped / copies,
        "router_entropy": sums["entropy_sum"] / sums["tokens"],
    }
    return aux, z, metrics


# ---------------------------------------------------------------------------------------------
# Experts


def swiglu_ECD(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD):
    h_ECF = nn.silu(jnp.einsum("ecd,edf->ecf", x_ECD, w_gate_EDF)) * jnp.einsum(
        "ecd,edf->ecf", x_ECD, w_up_EDF)
    return jnp.einsum("ecf,efd->ecd", h_ECF, w_down_EFD)


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


def grouped_swiglu_blocked(x_RD, group_R, w_gate_EDF, w_up_EDF, w_down_EFD):
    """SwiGLU of each row with its group's expert; rows with group >= E give zeros.

    XLA:CPU lowers ragged_dot densely (every expert on every row), so rows are placed, grouped, into
    a buffer padded to whole blocks of S rows, each block multiplies one expert's weights, and the
    results are read back: one extra gather and scatter against E-fold less matmul work."""
    E = w_gate_EDF.shape[0]
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
    out_NSD = swiglu_ECD(buffer_ND.reshape(N, S, D), w_gate_EDF[expert_N], w_up_EDF[expert_N],
                         w_down_EFD[expert_N])
    return out_NSD.reshape(N * S, D).at[dest_R].get(mode="fill", fill_value=0)


def grouped_swiglu_ragged(x_RD, group_R, w_gate_EDF, w_up_EDF, w_down_EFD):
    """The same with jax.lax.ragged_dot over rows sorted by group (GPU/TPU)."""
    E = w_gate_EDF.shape[0]
    order_R = jnp.argsort(group_R, stable=True)
    sizes_E = jax.ops.segment_sum(jnp.ones_like(group_R), group_R, num_segments=E)
    x_sorted_RD = jnp.where((group_R < E)[order_R, None], x_RD[order_R], 0)
    h_RF = nn.silu(jax.lax.ragged_dot(x_sorted_RD, w_gate_EDF, sizes_E)) * jax.lax.ragged_dot(
        x_sorted_RD, w_up_EDF, sizes_E)
    out_sorted_RD = jax.lax.ragged_dot(h_RF, w_down_EFD, sizes_E)
    return jnp.zeros_like(x_RD).at[order_R].set(out_sorted_RD)


def grouped_swiglu_dense(x_RD, group_R, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Every expert on every row, then the row's own result kept (the naive baseline)."""
    E = w_gate_EDF.shape[0]
    out_ERD = swiglu_ECD(jnp.broadcast_to(x_RD, (E, *x_RD.shape)), w_gate_EDF, w_up_EDF, w_down_EFD)
    return jnp.einsum("re,erd->rd", jax.nn.one_hot(group_R, E, dtype=x_RD.dtype), out_ERD)


def grouped_swiglu(kind: str):
    if kind == "auto":
        kind = "ragged_dot" if jax.default_backend() in ("gpu", "tpu") else "blocked"
    table = {"blocked": grouped_swiglu_blocked, "ragged_dot": grouped_swiglu_ragged,
             "dense": grouped_swiglu_dense}
    if kind not in table:
        raise ValueError(f"unknown model.moe.grouped_matmul {kind!r}; registered: {sorted(table)}")
    return table[kind]


def capacity(tokens: int, moe: MoeConfig) -> int:
    return max(1, math.ceil(moe.top_k * tokens / moe.num_experts * moe.capacity_factor))


# ---------------------------------------------------------------------------------------------
# One shard's tokens: route, dispatch, experts (possibly on other devices), combine


def moe_tokens(x_TD, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, moe: MoeConfig,
               expert_axis: str | None = None, num_shards: int = 1):
    """Returns (out [T, D], router sums, dropped count). With `expert_axis` (inside shard_map) the
    expert weights are this device's E/X experts and token copies are exchanged over that axis."""
    T, D = x_TD.shape
    E, K = moe.num_experts, moe.top_k
    X = num_shards
    E_local = E // X
    logits_TE = jnp.dot(x_TD.astype(jnp.float32), router_DE.astype(jnp.float32))
    experts_TK, weights_TK, probs_TE = route(logits_TE, moe)
    sums = router_sums(logits_TE, probs_TE, experts_TK, E)
    dtype = w_gate_EDF.dtype

    def exchange(buf, forward):
        # [X, ...] rows for each device <-> [X, ...] rows from each device.
        if expert_axis is None:
            return buf
        return jax.lax.all_to_all(buf, expert_axis, 0, 0, tiled=True)

    if moe.dispatch == "capacity":
        C = capacity(T, moe)
        # k-major order: every token's first choice claims a slot before any second choice.
        expert_R = experts_TK.T.reshape(-1)
        token_R = jnp.tile(jnp.arange(T), K)
        rank_R, _ = rank_within_group(expert_R, E)
        kept_R = rank_R < C
        slot_R = jnp.where(kept_R, expert_R * C + rank_R, E * C)
        buffer_ECD = jnp.zeros((E * C, D), dtype).at[slot_R].set(
            x_TD[token_R].astype(dtype), mode="drop").reshape(E, C, D)
        # [E, C, D] = [X, E_local, C, D]: after the exchange, X source shards per local expert.
        recv = exchange(buffer_ECD.reshape(X, E_local, C, D), True)
        local_in = recv.transpose(1, 0, 2, 3).reshape(E_local, X * C, D)
        local_out = swiglu_ECD(local_in, w_gate_EDF, w_up_EDF, w_down_EFD)
        back = exchange(local_out.reshape(E_local, X, C, D).transpose(1, 0, 2, 3), False)
        out_RD = back.reshape(E * C, D).at[slot_R].get(mode="fill", fill_value=0)
        out_TKD = out_RD.reshape(K, T, D).transpose(1, 0, 2)
        dropped = jnp.sum(1.0 - kept_R.astype(jnp.float32))
    elif moe.dispatch == "dropless":
        grouped = grouped_swiglu(moe.grouped_matmul)
        expert_R = experts_TK.reshape(-1)
        x_RD = jnp.repeat(x_TD.astype(dtype), K, axis=0)
        if expert_axis is None:
            out_RD = grouped(x_RD, expert_R, w_gate_EDF, w_up_EDF, w_down_EFD)
        else:
            # XLA:CPU has no ragged_all_to_all, so each device reserves the worst case for every
            # destination: all T tokens sending min(K, E_local) copies to one device.
            W = T * min(K, E_local)
            device_R = expert_R // E_local
            rank_R, _ = rank_within_group(device_R, X)
            slot_R = device_R * W + rank_R
            send_XWD = jnp.zeros((X * W, D), dtype).at[slot_R].set(x_RD).reshape(X, W, D)
            send_ids_XW = jnp.full((X * W,), E_local, jnp.int32).at[slot_R].set(
                expert_R % E_local).reshape(X, W)
            recv_XWD = exchange(send_XWD, True)
            recv_ids_XW = exchange(send_ids_XW, True)
            local_out = grouped(recv_XWD.reshape(X * W, D), recv_ids_XW.reshape(-1),
                                w_gate_EDF, w_up_EDF, w_down_EFD)
            back_XWD = exchange(local_out.reshape(X, W, D), False)
            out_RD = back_XWD.reshape(X * W, D)[slot_R]
        out_TKD = out_RD.reshape(T, K, D)
        dropped = jnp.zeros((), jnp.float32)
    else:
        raise ValueError(f"unknown model.moe.dispatch {moe.dispatch!r}; choose capacity or dropless")
    out_TD = jnp.einsum("tkd,tk->td", out_TKD.astype(jnp.float32), weights_TK)
    return out_TD.astype(x_TD.dtype), sums, dropped


def moe_sharded(x_BLD, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, moe: MoeConfig, mesh):
    """The layer under shard_map: tokens split over the batch axes, experts over `expert`.

    Expert weights enter with spec P("expert"): fsdp/tensor shards of them are gathered before the
    layer (as FSDP does for every weight), the expert dimension never is."""
    X = mesh.shape["expert"]
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.shape)

    def body(x_bLD, router_DE, w_gate, w_up, w_down):
        b, L, D = x_bLD.shape
        out_TD, sums, dropped = moe_tokens(
            x_bLD.reshape(b * L, D), router_DE, w_gate, w_up, w_down, moe,
            expert_axis="expert" if X > 1 else None, num_shards=X)
        sums, dropped = jax.lax.psum((sums, dropped), batch_axes)
        return out_TD.reshape(b, L, D), sums, dropped

    expert_spec = P("expert", None, None)
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(P(batch_axes, None, None), P(None, None), expert_spec, expert_spec, expert_spec),
        out_specs=(P(batch_axes, None, None), P(), P()),
    )(x_BLD, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD)


def batch_shards(mesh) -> int:
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES) if mesh.shape else 1


class MoeMlp(nn.Module):
    """Drop-in replacement for layers.Mlp (same call signature). Sows its weighted losses into the
    "losses" collection and its metrics into "metrics" (both read by train.lm_loss_fn)."""

    cfg: ModelConfig
    deterministic: bool = False

    @nn.compact
    def __call__(self, x_BLD):
        cfg, moe = self.cfg, self.cfg.moe
        E, D = moe.num_experts, cfg.d_model
        F = moe.expert_dim or cfg.mlp_dim
        dtype = layers.compute_dtype(cfg)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        router_DE = self.param("router", layers.dense_init(cfg.init_std, ("embed", None)), (D, E))
        w_gate = self.param("gate", layers.dense_init(cfg.init_std, ("expert", "embed", "mlp")), (E, D, F))
        w_up = self.param("up", layers.dense_init(cfg.init_std, ("expert", "embed", "mlp")), (E, D, F))
        w_down = self.param("down", layers.dense_init(out_std, ("expert", "mlp", "embed")), (E, F, D))

        x_in = x_BLD
        if moe.jitter > 0 and not self.deterministic and self.has_rng("dropout"):
            noise = jax.random.uniform(self.make_rng("dropout"), x_BLD.shape, x_BLD.dtype,
                                       1.0 - moe.jitter, 1.0 + moe.jitter)
            # Applied to the layer's input, so routing and experts both see it (simpler than
            # threading a separate router input through the exchange).
            x_in = x_BLD * noise
        weights = [w.astype(dtype) for w in (w_gate, w_up, w_down)]
        mesh = jax.sharding.get_abstract_mesh()
        B, L, _ = x_BLD.shape
        shards = batch_shards(mesh)
        if shards > 1 and B % shards == 0 and not self.is_initializing():
            out_BLD, sums, dropped = moe_sharded(x_in, router_DE, *weights, moe=moe, mesh=mesh)
        else:
            out_TD, sums, dropped = moe_tokens(x_in.reshape(B * L, D), router_DE, *weights, moe)
            out_BLD = out_TD.reshape(B, L, D)
        aux, z, metrics = losses_and_metrics(sums, dropped, E, moe.top_k)
        self.sow("losses", "moe", moe.aux_loss_weight * aux + moe.z_loss_weight * z)
        for name, value in metrics.items():
            self.sow("metrics", name, value)
        out_BLD = layers.constrain(out_BLD.astype(dtype), (layers.BATCH, layers.LENGTH, layers.ACT_EMBED))
        if moe.num_shared:
            shared_cfg = dataclasses.replace(
                cfg, mlp_dim=moe.num_shared * (moe.shared_dim or F))
            out_BLD = out_BLD + layers.Mlp(shared_cfg, name="shared")(x_BLD)
        return out_BLD
