"""Mixture-of-experts MLP (the MLP kind "moe"): float32 router, a registered routing function and
dispatch strategy, SwiGLU experts, optional shared experts, load-balancing and z losses, and expert
parallelism with `jax.shard_map`.

Shape legend: B batch, L length, D model width, F expert width, E experts, K top-k,
T tokens (B*L, local to a shard inside shard_map), R routed token copies (T*K), C capacity per
expert, X expert-axis size (devices), W rows per destination device in the dropless exchange.

Parameters (under the block's `mlp`): router [D, E], gate [E, D, F], up [E, D, F], down [E, F, D],
and `shared` (a layers.mlp.Mlp) when shared experts are enabled.

Extension points: `ROUTERS` (logits -> each token's experts and weights) and `DISPATCHES` (how token
copies reach their experts and come back). Whenever a mesh with more than one batch shard is
active, the layer runs inside `shard_map`: every shard routes its own tokens (capacity is per
shard, as in GShard's groups), token copies travel to the device holding their expert with
`all_to_all` over `expert`, and come back the same way. Losses and metrics are reduced over all
shards, so they equal the single-device values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxllm import ops
from jaxllm.config import ModelConfig, MoeConfig
from jaxllm.layers.base import compute_dtype, constrain, dense_init, with_dropout_keys
from jaxllm.layers.mlp import MLP_KINDS, Mlp
from jaxllm.ops.grouped_ffn import rank_within_group, swiglu_ECD
from jaxllm.ops.projection import Adapted
from jaxllm.registry import Registry
from jaxllm.sharding import ACT_EMBED, BATCH, BATCH_AXES, LENGTH


# ---------------------------------------------------------------------------------------------
# Routers: logits [T, E] (and the selection bias [E]) -> Routing (experts [T, K], weights [T, K],
# normalised affinities [T, E])

ROUTERS = Registry("model.moe.router")


class Routing(NamedTuple):
    experts_TK: jax.Array
    weights_TK: jax.Array
    probs_TE: jax.Array  # affinities summing to 1 (for the balance loss, and for expert-choice routing)


def select_experts(scores_TE, moe: MoeConfig, bias_E=None):
    """The k experts of highest score + bias [T, K]; with moe.num_groups > 1 only inside each
    token's moe.topk_groups groups of highest top-2 sum (DeepSeek-V3's group-limited routing,
    which bounds the devices a token's copies travel to). The bias picks, it never weighs."""
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    T, E = choice_TE.shape
    G = moe.num_groups
    if G > 1:
        grouped_TGM = choice_TE.reshape(T, G, E // G)
        group_score_TG = jnp.sum(jax.lax.top_k(grouped_TGM, min(2, E // G))[0], axis=-1)
        _, groups_TJ = jax.lax.top_k(group_score_TG, moe.topk_groups)
        kept_TG = jnp.any(groups_TJ[:, :, None] == jnp.arange(G), axis=1)
        choice_TE = jnp.where(jnp.repeat(kept_TG, E // G, axis=1), choice_TE, -jnp.inf)
    return jax.lax.top_k(choice_TE, moe.top_k)[1]


def _normalised(weights_TK):
    return weights_TK / (jnp.sum(weights_TK, axis=-1, keepdims=True) + 1e-20)


@ROUTERS.register("softmax_topk")
def softmax_topk(logits_TE, moe: MoeConfig, bias_E=None):
    """Softmax over all experts, then the top k (Switch, GShard); optionally renormalised."""
    probs_TE = jax.nn.softmax(logits_TE, axis=-1)
    experts_TK = select_experts(probs_TE, moe, bias_E)
    weights_TK = jnp.take_along_axis(probs_TE, experts_TK, axis=-1)
    return Routing(experts_TK, _normalised(weights_TK) if moe.renormalize else weights_TK, probs_TE)


@ROUTERS.register("topk_softmax")
def topk_softmax(logits_TE, moe: MoeConfig, bias_E=None):
    """The top k logits, then a softmax over those k (Mixtral)."""
    experts_TK = select_experts(logits_TE, moe, bias_E)
    weights_TK = jax.nn.softmax(jnp.take_along_axis(logits_TE, experts_TK, axis=-1), axis=-1)
    return Routing(experts_TK, weights_TK, jax.nn.softmax(logits_TE, axis=-1))


@ROUTERS.register("sigmoid")
def sigmoid_topk(logits_TE, moe: MoeConfig, bias_E=None):
    """DeepSeek-V3: affinities sigmoid(logits), the top k of affinity + bias, weighted by their
    un-biased affinities (normalised over the k if moe.renormalize). The balance loss sees the
    affinities normalised over all experts (V3's sequence-wise loss uses the same)."""
    affinity_TE = jax.nn.sigmoid(logits_TE)
    experts_TK = select_experts(affinity_TE, moe, bias_E)
    weights_TK = jnp.take_along_axis(affinity_TE, experts_TK, axis=-1)
    return Routing(experts_TK, _normalised(weights_TK) if moe.renormalize else weights_TK,
                   affinity_TE / jnp.sum(affinity_TE, axis=-1, keepdims=True))


def route(logits_TE, moe: MoeConfig, bias_E=None) -> Routing:
    """The configured router's Routing, its weights times moe.routed_scale."""
    routing = ROUTERS.get(moe.router)(logits_TE, moe, bias_E)
    if moe.routed_scale != 1.0:
        routing = routing._replace(weights_TK=routing.weights_TK * moe.routed_scale)
    return routing


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
        "expert_load": fraction_E,  # [E]: what the train step balances the router bias with
    }
    return aux, z, metrics


def capacity(tokens: int, moe: MoeConfig) -> int:
    """Slots per expert for a group of `tokens` tokens: ceil(top_k · tokens / E · capacity_factor)."""
    return max(1, math.ceil(moe.top_k * tokens / moe.num_experts * moe.capacity_factor))


def row_capacity(valid_tokens_b, moe: MoeConfig):
    """`capacity` of each row counted over its valid tokens only (traced), so that padding, and
    with it the padded length and the batchmates, never changes what a row's tokens get."""
    slots = jnp.ceil(moe.top_k * valid_tokens_b.astype(jnp.float32) / moe.num_experts * moe.capacity_factor)
    return jnp.maximum(slots, 1.0).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Dispatch strategies: token copies -> experts (possibly on other devices) -> combined output


class Exchange(NamedTuple):
    """Where the experts live: `axis` is the mesh axis they are split over inside shard_map
    (None: all experts on this device) and `shards` its size X."""

    axis: str | None = None
    shards: int = 1

    def __call__(self, buf):
        """[X, ...]: rows for each device -> rows from each device (its own inverse)."""
        if self.axis is None:
            return buf
        return jax.lax.all_to_all(buf, self.axis, 0, 0, tiled=True)

    def experts_major(self, buffer_EMD, w_gate_EDF, w_up_EDF, w_down_EFD):
        """Each expert's SwiGLU on its M rows of an expert-major buffer [E, M, D] whose experts may
        live on other devices: rows travel to their expert's device and back."""
        E, M, D = buffer_EMD.shape
        X = self.shards
        recv_XEMD = self(buffer_EMD.reshape(X, E // X, M, D))
        local_in = recv_XEMD.transpose(1, 0, 2, 3).reshape(E // X, X * M, D)
        local_out = swiglu_ECD(local_in, w_gate_EDF, w_up_EDF, w_down_EFD)
        back = self(local_out.reshape(E // X, X, M, D).transpose(1, 0, 2, 3))
        return back.reshape(E, M, D)


def combine(out_TKD, weights_TK):
    """Σ_k weight[t, k] · out[t, k] in float32."""
    return jnp.einsum("tkd,tk->td", out_TKD.astype(jnp.float32), weights_TK)


# A dispatch strategy: (x [b, L, D], valid [b, L], routing, expert weights (gate, up, down),
# moe config, exchange) -> (combined output [b·L, D] float32, number of dropped token copies).
DISPATCHES = Registry("model.moe.dispatch")


@DISPATCHES.register("capacity")
def capacity_dispatch(x_bLD, valid_bL, routing: Routing, experts, moe: MoeConfig, exchange: Exchange):
    """Each expert takes at most C copies per row (GShard); the rest are dropped.

    Capacity is per sequence (each row of L tokens is a GShard "group") and counted over the row's
    valid tokens: which tokens are dropped then depends on the row's own tokens alone, not on how
    the batch is split over devices, on the padding or on the other rows."""
    b, L, D = x_bLD.shape
    T, E, K = b * L, moe.num_experts, moe.top_k
    x_TD = x_bLD.reshape(T, D)
    C = capacity(L, moe)  # the buffer's slots: enough for a row without padding
    # Copies in row-major, then k-major order: within a row, every token's first choice claims
    # a slot before any second choice.
    expert_R = routing.experts_TK.reshape(b, L, K).transpose(0, 2, 1).reshape(-1)
    row_R = jnp.repeat(jnp.arange(b), K * L)
    token_R = row_R * L + jnp.tile(jnp.arange(L), b * K)
    valid_R = valid_bL.reshape(T)[token_R]
    # Padding copies go to no group: they neither take a slot nor push a real copy back.
    rank_R, _ = rank_within_group(jnp.where(valid_R, row_R * E + expert_R, b * E), b * E)
    limit_b = row_capacity(jnp.sum(valid_bL, axis=1), moe)
    kept_R = valid_R & (rank_R < limit_b[row_R])
    # Expert-major buffer [E, b·C, D]: the first axis is the expert (and the device holding it).
    slot_R = jnp.where(kept_R, (expert_R * b + row_R) * C + rank_R, E * b * C)
    buffer = jnp.zeros((E * b * C, D), x_bLD.dtype).at[slot_R].set(x_TD[token_R], mode="drop")
    out_EMD = exchange.experts_major(buffer.reshape(E, b * C, D), *experts)
    out_RD = out_EMD.reshape(E * b * C, D).at[slot_R].get(mode="fill", fill_value=0)
    out_TKD = out_RD.reshape(b, K, L, D).transpose(0, 2, 1, 3).reshape(T, K, D)
    dropped = jnp.sum((valid_R & ~kept_R).astype(jnp.float32))
    return combine(out_TKD, routing.weights_TK), dropped


@DISPATCHES.register("dropless")
def dropless_dispatch(x_bLD, valid_bL, routing: Routing, experts, moe: MoeConfig, exchange: Exchange):
    """Every copy reaches its expert: a grouped SwiGLU over the copies sorted by expert."""
    b, L, D = x_bLD.shape
    T, K = b * L, moe.top_k
    X = exchange.shards
    E_local = moe.num_experts // X
    grouped = ops.grouped_swiglu(moe.grouped_matmul)
    expert_R = routing.experts_TK.reshape(-1)
    x_RD = jnp.repeat(x_bLD.reshape(T, D), K, axis=0)
    if exchange.axis is None:
        out_RD = grouped(x_RD, expert_R, *experts)
    else:
        # XLA:CPU has no ragged_all_to_all, so each device reserves the worst case for every
        # destination: all T tokens sending min(K, E_local) copies to one device. With static
        # shapes the receiver's blocked grouped matmul is sized for that worst case too (X
        # times the average load), the price of never dropping a token without a ragged exchange.
        W = T * min(K, E_local)
        device_R = expert_R // E_local
        rank_R, _ = rank_within_group(device_R, X)
        slot_R = device_R * W + rank_R
        send_XWD = jnp.zeros((X * W, D), x_bLD.dtype).at[slot_R].set(x_RD).reshape(X, W, D)
        send_ids_XW = jnp.full((X * W,), E_local, jnp.int32).at[slot_R].set(
            expert_R % E_local).reshape(X, W)
        recv_XWD = exchange(send_XWD)
        recv_ids_XW = exchange(send_ids_XW)
        local_out = grouped(recv_XWD.reshape(X * W, D), recv_ids_XW.reshape(-1), *experts)
        back_XWD = exchange(local_out.reshape(X, W, D))
        out_RD = back_XWD.reshape(X * W, D)[slot_R]
    return combine(out_RD.reshape(T, K, D), routing.weights_TK), jnp.zeros((), jnp.float32)


# ---------------------------------------------------------------------------------------------
# One shard's tokens: route, dispatch, combine


def moe_tokens(x_bLD, valid_bL, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, moe: MoeConfig,
               expert_axis: str | None = None, num_shards: int = 1, bias_E=None):
    """Returns (out [b, L, D], router sums, dropped count) for a shard of b sequences. With
    `expert_axis` (inside shard_map) the expert weights are this device's E/X experts and token
    copies are exchanged over that axis. `valid_bL` marks the tokens that are not padding: only
    they count in the router losses and metrics and take expert capacity."""
    b, L, D = x_bLD.shape
    T = b * L
    x_TD = x_bLD.reshape(T, D)
    logits_TE = jnp.dot(x_TD.astype(jnp.float32), router_DE.astype(jnp.float32))
    routing = route(logits_TE, moe, bias_E)
    sums = router_sums(logits_TE, routing.probs_TE, routing.experts_TK, moe.num_experts, valid_bL.reshape(T))
    dispatch = DISPATCHES.get(moe.dispatch)
    out_TD, dropped = dispatch(x_bLD, valid_bL, routing, (w_gate_EDF, w_up_EDF, w_down_EFD), moe,
                               Exchange(expert_axis, num_shards))
    return out_TD.astype(x_bLD.dtype).reshape(b, L, D), sums, dropped


def moe_sharded(x_BLD, valid_BL, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, moe: MoeConfig, mesh, bias_E):
    """The layer under shard_map: sequences split over the batch axes, experts over `expert`.

    Expert weights enter with spec P("expert"): fsdp/tensor shards of them are gathered before the
    layer (as FSDP does for every weight), the expert dimension never is."""
    X = mesh.shape["expert"]
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.shape)

    def body(x_bLD, valid_bL, router_DE, w_gate, w_up, w_down, bias_E):
        if batch_axes:  # LoRA dropout: devices holding other sequences draw other masks
            shard = jax.lax.axis_index(batch_axes)
            w_gate, w_up, w_down = (w.fold_in(shard) if isinstance(w, Adapted) else w for w in (w_gate, w_up, w_down))
        out_bLD, sums, dropped = moe_tokens(
            x_bLD, valid_bL, router_DE, w_gate, w_up, w_down, moe,
            expert_axis="expert" if X > 1 else None, num_shards=X, bias_E=bias_E)
        sums, dropped = jax.lax.psum((sums, dropped), batch_axes)
        return out_bLD, sums, dropped

    expert_spec = P("expert")  # a prefix: also covers an int8 kernel's parts and an adapted one's
    return jax.shard_map(
        body, mesh=mesh,
        in_specs=(P(batch_axes, None, None), P(batch_axes, None), P(None, None),
                  expert_spec, expert_spec, expert_spec, P(None)),
        out_specs=(P(batch_axes, None, None), P(), P()),
    )(x_BLD, valid_BL, router_DE, w_gate_EDF, w_up_EDF, w_down_EFD, bias_E)


def batch_shards(mesh) -> int:
    return math.prod(mesh.shape.get(a, 1) for a in BATCH_AXES) if mesh.shape else 1


@MLP_KINDS.register("moe")
class MoeMlp(nn.Module):
    """The MLP kind "moe" (same call signature as layers.mlp.Mlp). Sows its weighted losses into
    the "losses" collection and its metrics into "metrics" (read by `collect`)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, valid_BL=None):
        cfg, moe = self.cfg, self.cfg.moe
        E, D = moe.num_experts, cfg.d_model
        F = moe.expert_dim or cfg.mlp_dim
        dtype = compute_dtype(cfg)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        router_DE = self.param("router", dense_init(cfg.init_std, ("embed", None)), (D, E))
        # Kept with the params (checkpoints, restore and export carry it) but trained by no
        # gradient: the train step moves it (`update_router_biases`).
        bias_E = jnp.zeros((E,), jnp.float32)
        if moe.router_bias:
            bias_E = jax.lax.stop_gradient(self.param(
                "router_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (E,), jnp.float32))
        w_gate = self.param("gate", dense_init(cfg.init_std, ("expert", "embed", "mlp")), (E, D, F))
        w_up = self.param("up", dense_init(cfg.init_std, ("expert", "embed", "mlp")), (E, D, F))
        w_down = self.param("down", dense_init(out_std, ("expert", "mlp", "embed")), (E, F, D))
        # LoRA on the experts: one adapter (and dropout key) per expert; no-op for plain kernels.
        w_gate, w_up, w_down = with_dropout_keys(self, w_gate, w_up, w_down)

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
                                                 moe=moe, mesh=mesh, bias_E=bias_E)
        else:
            out_BLD, sums, dropped = moe_tokens(x_in, valid_BL, router_DE, w_gate, w_up, w_down, moe,
                                                bias_E=bias_E)
        aux, z, metrics = losses_and_metrics(sums, dropped, E, moe.top_k)
        self.sow("losses", "moe", moe.aux_loss_weight * aux + moe.z_loss_weight * z)
        for name, value in metrics.items():
            self.sow("metrics", name, value)
        out_BLD = constrain(out_BLD, (BATCH, LENGTH, ACT_EMBED))
        if moe.num_shared:
            shared_cfg = dataclasses.replace(cfg, mlp_dim=moe.num_shared * (moe.shared_dim or F))
            out_BLD = out_BLD + Mlp(shared_cfg, name="shared")(x_BLD)
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


def _leaves_by_layer(tree, name: str, with_paths: bool = False):
    """The leaves named `name` anywhere in `tree`, ordered by layer (stable within a layer); with
    `with_paths`, (path, leaf) pairs."""
    found = [(_layer_order(path), (path, leaf)) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
             if any(str(getattr(k, "key", "")) == name for k in path)]
    return [item if with_paths else item[1] for _, item in sorted(found, key=lambda item: item[0])]


def _per_layer(tree, name: str):
    """The values sown under `name` anywhere in `tree`, as one vector ordered by layer."""
    found = _leaves_by_layer(tree, name)
    return jnp.concatenate([jnp.atleast_1d(v) for v in found]) if found else None


def collect(variables) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(weighted router loss summed over the MoE layers, {metric: [MoE layers] vector}) from the
    "losses" and "metrics" collections of an apply with those collections mutable; (0, {}) for a
    dense model. "moe/expert_load" is [MoE layers, E]: each expert's share of the token copies."""
    losses = _per_layer(variables.get("losses", {}), "moe")
    if losses is None:
        return jnp.zeros((), jnp.float32), {}
    metrics = variables.get("metrics", {})
    names = ("aux_loss", "z_loss", "expert_fraction_max", "expert_fraction_min", "dropped_fraction",
             "router_entropy")
    loads = [v.reshape(-1, v.shape[-1]) for v in _leaves_by_layer(metrics, "expert_load")]
    return jnp.sum(losses), {**{f"moe/{n}": _per_layer(metrics, n) for n in names},
                             "moe/expert_load": jnp.concatenate(loads)}


def update_router_biases(old_params, new_params, load_LE, rate: float):
    """`new_params` with every router bias set to its old value + rate · sign(mean load - load)
    per expert (DeepSeek-V3's aux-loss-free balancing: an overloaded expert's bias falls, an idle
    one's rises). `load_LE` is collect's "moe/expert_load", one row per MoE layer in the order of
    the biases; the optimizer's update of a bias (zero: it has no gradient) is discarded."""
    old = _leaves_by_layer(old_params, "router_bias", with_paths=True)
    if not old:
        return new_params
    rows = [b.size // b.shape[-1] for _, b in old]
    if sum(rows) != load_LE.shape[0]:
        raise ValueError(f"{load_LE.shape[0]} rows of expert load for {sum(rows)} router biases")
    delta_LE = rate * jnp.sign(jnp.mean(load_LE, axis=-1, keepdims=True) - load_LE)
    updated, offset = {}, 0
    for (path, b), n in zip(old, rows):
        updated[path] = b + delta_LE[offset:offset + n].reshape(b.shape).astype(b.dtype)
        offset += n
    return jax.tree_util.tree_map_with_path(lambda p, leaf: updated.get(p, leaf), new_params)
