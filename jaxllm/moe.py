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
from jaxllm.sharding import BATCH_AXES


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


def router_sums(logits_TE, probs_TE, experts_TK, num_experts: int, valid_T):
    """Per-shard sums over the valid (non-padding) tokens, from which the losses and metrics are
    formed once all shards are added up."""
    w_T = valid_T.astype(jnp.float32)
    counts_E = jnp.einsum("tke,t->e", jax.nn.one_hot(experts_TK, num_experts, dtype=jnp.float32), w_T)
    entropy_T = -jnp.sum(probs_TE * jnp.log(jnp.maximum(probs_TE, 1e-30)), axis=-1)
    return {
        "counts_E": counts_E,
        "prob_sum_E": jnp.einsum("te,t->e", probs_TE, w_T),
        "z_sum": jnp.sum(jnp.square(jax.nn.logsumexp(logits_TE, axis=-1)) * w_T),
        "entropy_sum": jnp.sum(entropy_T * w_T),
        "tokens": jnp.sum(w_T),
    }


def losses_and_metrics(sums, dropped, num_experts: int, top_k: int):
    """Switch load-balancing loss E·Σ f_i·P_i (1.0 under uniform routing), z-loss and metrics."""
    tokens = jnp.maximum(sums["tokens"], 1.0)  # a batch of padding only has no routing to score
    copies = tokens * top_k
    fraction_E = sums["counts_E"] / copies
    mean_prob_E = sums["prob_sum_E"] / tokens
    aux = num_experts * jnp.sum(fraction_E * mean_prob_E)
    z = sums["z_sum"] / tokens
    metrics = {
        "aux_loss": aux,
        "z_loss": z,
        "expert_fraction_max": jnp.max(fraction_E),
        "expert_fraction_min": jnp.min(fraction_E),
        "dropped_fraction": dropped / copies,
        "router_entropy": sums["entropy_sum"] / tokens,
    }
    return aux, z, metrics


# ---------------------------------------------------------------------------------------------
# Experts
#
# An expert kernel is a float array, or an int8-quantized one ({"int8": values, "scale": scales},
# see jaxllm.quantize): the values enter the matmul in the compute dtype and the per-output-channel
# scale (shape [E, 1, F]) multiplies its output, so no float copy of the weights is made.


def _take_experts(w, index):
    return jax.tree.map(lambda a: a[index], w)


def _expert_dot(x, w, spec: str):
    if layers.is_quantized(w):
        y = jnp.einsum(spec, x, w[layers.QUANTIZED_VALUES].astype(x.dtype))
        return y * w[layers.QUANTIZED_SCALE].astype(x.dtype)
    return jnp.einsum(spec, x, w.astype(x.dtype))


def swiglu_ECD(x_ECD, w_gate_EDF, w_up_EDF, w_down_EFD):
    h_ECF = nn.silu(_expert_dot(x_ECD, w_gate_EDF, "ecd,edf->ecf")) * _expert_dot(
        x_ECD, w_up_EDF, "ecd,edf->ecf")
    return _expert_dot(h_ECF, w_down_EFD, "ecf,efd->ecd")


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
    if layers.is_quantized(w_EDF):
        y = jax.lax.ragged_dot(x_RD, w_EDF[layers.QUANTIZED_VALUES].astype(x_RD.dtype), sizes_E)
        return y * w_EDF[layers.QUANTIZED_SCALE][expert_sorted_R, 0].astype(x_RD.dtype)
    return jax.lax.ragged_dot(x_RD, w_EDF.astype(x_RD.dtype), sizes_E)


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


def grouped_swiglu_dense(x_RD, group_R, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Every expert on every row, then the row's own result kept (the naive baseline)."""
    E = jax.tree.leaves(w_gate_EDF)[0].shape[0]
    out_ERD = swiglu_ECD(jnp.broadcast_to(x_RD, (E, *x_RD.shape)), w_gate_EDF, w_up_EDF, w_down_EFD)
    return jnp.einsum("re,erd->rd", jax.nn.one_hot(group_R, E, dtype=x_RD.dtype), out_ERD)


GROUPED_MATMULS = {"blocked": grouped_swiglu_blocked, "ragged_dot": grouped_swiglu_ragged,
                   "dense": grouped_swiglu_dense}


def grouped_swiglu(kind: str):
    if kind == "auto":
        kind = "ragged_dot" if jax.default_backend() in ("gpu", "tpu") else "blocked"
    if kind not in GROUPED_MATMULS:
        raise ValueError(f"unknown model.moe.grouped_matmul {kind!r}; registered: {sorted(GROUPED_MATMULS)}")
    return GROUPED_MATMULS[kind]


def capacity(tokens: int, moe: MoeConfig) -> int:
    """Slots per expert for a group of `tokens` tokens: ceil(top_k · tokens / E · capacity_factor)."""
    return max(1, math.ceil(moe.top_k * tokens / moe.num_experts * moe.capacity_factor))


def row_capacity(valid_tokens_b, moe: MoeConfig):
    """`capacity` of each row counted over its valid tokens only (traced), so that padding, and
    with it the padded length and the batchmates, never changes what a row's tokens get."""
    slots = jnp.ceil(moe.top_k * valid_tokens_b.astype(jnp.float32) / moe.num_experts * moe.capacity_factor)
    return jnp.maximum(slots, 1.0).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# One shard's tokens: route, dispatch, experts (possibly on other devices), combine


def moe_tokens(x_bLD, valid_bL, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, moe: MoeConfig,
               expert_axis: str | None = None, num_shards: int = 1):
    """Returns (out [b, L, D], router sums, dropped count) for a shard of b sequences. With
    `expert_axis` (inside shard_map) the expert weights are this device's E/X experts and token
    copies are exchanged over that axis. `valid_bL` marks the tokens that are not padding: only
    they count in the router losses and metrics and take expert capacity.

    Capacity is per sequence (each row of L tokens is a GShard "group") and counted over the row's
    valid tokens: which tokens are dropped then depends on the row's own tokens alone, not on how
    the batch is split over devices, on the padding or on the other rows."""
    b, L, D = x_bLD.shape
    T = b * L
    E, K = moe.num_experts, moe.top_k
    X = num_shards
    E_local = E // X
    x_TD = x_bLD.reshape(T, D)
    logits_TE = jnp.dot(x_TD.astype(jnp.float32), router_DE.astype(jnp.float32))
    experts_TK, weights_TK, probs_TE = route(logits_TE, moe)
    sums = router_sums(logits_TE, probs_TE, experts_TK, E, valid_bL.reshape(T))
    dtype = x_bLD.dtype

    def exchange(buf):
        # [X, ...]: rows for each device -> rows from each device (its own inverse).
        if expert_axis is None:
            return buf
        return jax.lax.all_to_all(buf, expert_axis, 0, 0, tiled=True)

    if moe.dispatch == "capacity":
        C = capacity(L, moe)  # the buffer's slots: enough for a row without padding
        # Copies in row-major, then k-major order: within a row, every token's first choice claims
        # a slot before any second choice.
        expert_R = experts_TK.reshape(b, L, K).transpose(0, 2, 1).reshape(-1)
        row_R = jnp.repeat(jnp.arange(b), K * L)
        token_R = row_R * L + jnp.tile(jnp.arange(L), b * K)
        valid_R = valid_bL.reshape(T)[token_R]
        # Padding copies go to no group: they neither take a slot nor push a real copy back.
        rank_R, _ = rank_within_group(jnp.where(valid_R, row_R * E + expert_R, b * E), b * E)
        limit_b = row_capacity(jnp.sum(valid_bL, axis=1), moe)
        kept_R = valid_R & (rank_R < limit_b[row_R])
        # Expert-major buffer [E, b·C, D] = [X, E_local, b·C, D]: the first axis is the device
        # holding the expert.
        slot_R = jnp.where(kept_R, (expert_R * b + row_R) * C + rank_R, E * b * C)
        buffer = jnp.zeros((E * b * C, D), dtype).at[slot_R].set(x_TD[token_R], mode="drop")
        recv_XECD = exchange(buffer.reshape(X, E_local, b * C, D))
        local_in = recv_XECD.transpose(1, 0, 2, 3).reshape(E_local, X * b * C, D)
        local_out = swiglu_ECD(local_in, w_gate_EDF, w_up_EDF, w_down_EFD)
        back = exchange(local_out.reshape(E_local, X, b * C, D).transpose(1, 0, 2, 3))
        out_RD = back.reshape(E * b * C, D).at[slot_R].get(mode="fill", fill_value=0)
        out_TKD = out_RD.reshape(b, K, L, D).transpose(0, 2, 1, 3).reshape(T, K, D)
        dropped = jnp.sum((valid_R & ~kept_R).astype(jnp.float32))
    elif moe.dispatch == "dropless":
        grouped = grouped_swiglu(moe.grouped_matmul)
        expert_R = experts_TK.reshape(-1)
        x_RD = jnp.repeat(x_TD, K, axis=0)
        if expert_axis is None:
            out_RD = grouped(x_RD, expert_R, w_gate_EDF, w_up_EDF, w_down_EFD)
        else:
            # XLA:CPU has no ragged_all_to_all, so each device reserves the worst case for every
            # destination: all T tokens sending min(K, E_local) copies to one device. With static
            # shapes the receiver's blocked grouped matmul is sized for that worst case too (X
            # times the average load), the price of never dropping a token without a ragged exchange.
            W = T * min(K, E_local)
            device_R = expert_R // E_local
            rank_R, _ = rank_within_group(device_R, X)
            slot_R = device_R * W + rank_R
            send_XWD = jnp.zeros((X * W, D), dtype).at[slot_R].set(x_RD).reshape(X, W, D)
            send_ids_XW = jnp.full((X * W,), E_local, jnp.int32).at[slot_R].set(
                expert_R % E_local).reshape(X, W)
            recv_XWD = exchange(send_XWD)
            recv_ids_XW = exchange(send_ids_XW)
            local_out = grouped(recv_XWD.reshape(X * W, D), recv_ids_XW.reshape(-1),
                                w_gate_EDF, w_up_EDF, w_down_EFD)
            back_XWD = exchange(local_out.reshape(X, W, D))
            out_RD = back_XWD.reshape(X * W, D)[slot_R]
        out_TKD = out_RD.reshape(T, K, D)
        dropped = jnp.zeros((), jnp.float32)
    else:
        raise ValueError(f"unknown model.moe.dispatch {moe.dispatch!r}; choose capacity or dropless")
    out_TD = jnp.einsum("tkd,tk->td", out_TKD.astype(jnp.float32), weights_TK)
    return out_TD.astype(dtype).reshape(b, L, D), sums, dropped


def moe_sharded(x_BLD, valid_BL, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, moe: MoeConfig, mesh):
    """The layer under shard_map: sequences split over the batch axes, experts over `expert`.

    Expert weights enter with spec P("expert"): fsdp/tensor shards of them are gathered before the
    layer (as FSDP does for every weight), the expert dimension never is."""
    X = mesh.shape["expert"]
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.shape)

    def body(x_bLD, valid_bL, router_DE, w_gate, w_up, w_down):
        out_bLD, sums, dropped = moe_tokens(
            x_bLD, valid_bL, router_DE, w_gate, w_up, w_down, moe,
            expert_axis="expert" if X > 1 else None, num_shards=X)
        sums, dropped = jax.lax.psum((sums, dropped), batch_axes)
        return out_bLD, sums, dropped

    expert_spec = P("expert", None, None)  # a prefix: also covers an int8 kernel's values and scales
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(P(batch_axes, None, None), P(batch_axes, None), P(None, None),
                  expert_spec, expert_spec, expert_spec),
        out_specs=(P(batch_axes, None, None), P(), P()),
    )(x_BLD, valid_BL, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD)


def batch_shards(mesh) -> int:
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES) if mesh.shape else 1


class MoeMlp(nn.Module):
    """Drop-in replacement for layers.Mlp (same call signature, plus the optional mask of the
    tokens that are not padding). Sows its weighted losses into the "losses" collection and its
    metrics into "metrics" (read by `collect`)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, valid_BL=None):
        cfg, moe = self.cfg, self.cfg.moe
        E, D = moe.num_experts, cfg.d_model
        F = moe.expert_dim or cfg.mlp_dim
        dtype = layers.compute_dtype(cfg)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        router_DE = self.param("router", layers.dense_init(cfg.init_std, ("embed", None)), (D, E))
        w_gate = self.param("gate", layers.dense_init(cfg.init_std, ("expert", "embed", "mlp")), (E, D, F))
        w_up = self.param("up", layers.dense_init(cfg.init_std, ("expert", "embed", "mlp")), (E, D, F))
        w_down = self.param("down", layers.dense_init(out_std, ("expert", "mlp", "embed")), (E, F, D))

        x_in = x_BLD.astype(dtype)
        if moe.jitter > 0 and self.has_rng("dropout"):
            noise = jax.random.uniform(self.make_rng("dropout"), x_BLD.shape, dtype,
                                       1.0 - moe.jitter, 1.0 + moe.jitter)
            # Applied to the layer's input, so routing and experts both see it (simpler than
            # threading a separate router input through the exchange).
            x_in = x_in * noise
        mesh = jax.sharding.get_abstract_mesh()
        B = x_BLD.shape[0]
        shards = batch_shards(mesh)
        if valid_BL is None:
            valid_BL = jnp.ones(x_BLD.shape[:2], bool)
        if shards > 1 and B % shards == 0 and not self.is_initializing():
            out_BLD, sums, dropped = moe_sharded(x_in, valid_BL, router_DE, w_gate, w_up, w_down,
                                                 moe=moe, mesh=mesh)
        else:
            out_BLD, sums, dropped = moe_tokens(x_in, valid_BL, router_DE, w_gate, w_up, w_down, moe)
        aux, z, metrics = losses_and_metrics(sums, dropped, E, moe.top_k)
        self.sow("losses", "moe", moe.aux_loss_weight * aux + moe.z_loss_weight * z)
        for name, value in metrics.items():
            self.sow("metrics", name, value)
        out_BLD = layers.constrain(out_BLD, (layers.BATCH, layers.LENGTH, layers.ACT_EMBED))
        if moe.num_shared:
            shared_cfg = dataclasses.replace(cfg, mlp_dim=moe.num_shared * (moe.shared_dim or F))
            out_BLD = out_BLD + layers.Mlp(shared_cfg, name="shared")(x_BLD)
        return out_BLD


# ---------------------------------------------------------------------------------------------
# Reading the sown losses and metrics


def _layer_order(path) -> int:
    # Unscanned stacks name their blocks block_0, block_1, ...; a scanned stack has one leaf per
    # position in its repeated group, already ordered along the layers axis.
    for key in path:
        name = str(getattr(key, "key", key))
        if name.startswith("block_"):
            return int(name[len("block_"):])
    return 0


def _per_layer(tree, name: str):
    """The values sown under `name` anywhere in `tree`, as one vector ordered by layer."""
    found = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if any(str(getattr(k, "key", "")) == name for k in path):
            found.append((_layer_order(path), jnp.atleast_1d(leaf)))
    found.sort(key=lambda item: item[0])
    return jnp.concatenate([v for _, v in found]) if found else None


def collect(variables) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weighted router loss summed over the MoE layers, {metric: [MoE layers] vector}) from the
    "losses" and "metrics" collections of an apply with those collections mutable; (0, {}) for a
    dense model."""
    losses = _per_layer(variables.get("losses", {}), "moe")
    if losses is None:
        return jnp.zeros((), jnp.float32), {}
    metrics = variables.get("metrics", {})
    names = ("aux_loss", "z_loss", "expert_fraction_max", "expert_fraction_min", "dropped_fraction",
             "router_entropy")
    return jnp.sum(losses), {f"moe/{n}": _per_layer(metrics, n) for n in names}
