"""Multi-head attention with grouped-query heads, RoPE and an optional KV cache, and the registry
of attention kinds: each kind is its mask builder (which keys a query sees) and whether that mask
is causal.

    out = softmax(q kᵀ / sqrt(K) where mask) v,   q = RoPE(x W_q), k = RoPE(x W_k), v = x W_v

The config's recipe fields add to it: q/k norms (model.qk_norm), an output bias, another score
scale (model.query_scale), soft-capped scores (model.attn_logit_softcap), and a per-block kind and
RoPE base (model.attention_pattern, model.rope_thetas; see `layer_config`).

A research fork adds a kind with one registration (layers/sliding_window.py is an example):

    ATTENTION_KINDS.register("my_kind", AttentionKind(lambda q, k, cfg: same_document(q, k) & ...))

Shape legend as in layers/base.py.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import ops
from jaxllm.config import ModelConfig, RopeScalingConfig
from jaxllm.layers.base import (POSITION_KINDS, apply_rotary, compute_dtype, constrain, dense_init, norm,
                                rotary_sin_cos, with_dropout_keys)
from jaxllm.ops.attention import attention_bias
from jaxllm.ops.projection import unadapted, with_adapter
from jaxllm.registry import Registry
from jaxllm.sharding import ACT_EMBED, ACT_HEADS, BATCH, LENGTH


class Tokens(NamedTuple):
    """What a mask builder knows about the queries or the keys of one attention call."""

    segment_ids: jax.Array  # [B, L] document ids; 0 is padding
    index: jax.Array  # [B, L] slot in the sequence (the cache slot when decoding)
    prefix: jax.Array | None = None  # [B, L] True inside a bidirectional prefix (prefix-LM)


def same_document(q: Tokens, k: Tokens):
    """[B, L, S]: key in the query's document and not padding."""
    return (q.segment_ids[:, :, None] == k.segment_ids[:, None, :]) & (k.segment_ids != 0)[:, None, :]


def not_after(q: Tokens, k: Tokens):
    """[B, L, S]: key not later than the query."""
    return q.index[:, :, None] >= k.index[:, None, :]


@dataclasses.dataclass(frozen=True)
class AttentionKind:
    """mask(q, k, cfg) -> bool [B, L, S]: which keys each query sees; it is called with the
    queries' and keys' own slots during training and with cache slots when decoding, so the same
    builder also decides what a cached decoder attends to. `causal`: no query ever sees a later
    key, which lets the fast paths skip future blocks (and use cuDNN's causal kernel).
    `decodes`: whether cached generation makes sense for the kind."""

    mask: Callable[[Tokens, Tokens, ModelConfig], jax.Array]
    causal: bool = True
    decodes: bool = True


ATTENTION_KINDS = Registry("model.attention_kind")


def _causal(q, k, cfg):
    return same_document(q, k) & not_after(q, k)


def _bidirectional(q, k, cfg):
    return same_document(q, k)


def _prefix_lm(q, k, cfg):
    """Causal, except that keys of the prefix are seen by every query of their document (the
    prefix attends to itself bidirectionally; PaliGemma, T5's prefix-LM)."""
    k_prefix = jnp.zeros_like(k.segment_ids, bool) if k.prefix is None else k.prefix
    return same_document(q, k) & (not_after(q, k) | k_prefix[:, None, :])


ATTENTION_KINDS.register("causal", AttentionKind(_causal))
ATTENTION_KINDS.register("dot_product", AttentionKind(_causal))  # the name older configs saved
ATTENTION_KINDS.register("bidirectional", AttentionKind(_bidirectional, causal=False, decodes=False))
ATTENTION_KINDS.register("prefix_lm", AttentionKind(_prefix_lm, causal=False))


def attention_mask(q_segment_BL, k_segment_BS, q_index_BL, k_index_BS):
    """The causal mask: same document, key not in the future, key not padding."""
    return _causal(Tokens(q_segment_BL, q_index_BL), Tokens(k_segment_BS, k_index_BS), None)


def pattern_period(cfg: ModelConfig) -> int:
    """Blocks after which model.attention_pattern repeats (1 without a pattern)."""
    return len(cfg.attention_pattern) or 1


def layer_config(cfg: ModelConfig, index: int) -> ModelConfig:
    """The config block `index` runs with: its entry of model.attention_pattern as attention_kind
    and its RoPE base (an entry with its own base has no rope scaling). Without a pattern, `cfg`."""
    if not cfg.attention_pattern:
        return cfg
    j = index % len(cfg.attention_pattern)
    theta = cfg.rope_thetas[j] if cfg.rope_thetas else 0.0
    if theta:
        return dataclasses.replace(cfg, attention_kind=cfg.attention_pattern[j], rope_theta=theta,
                                   rope_scaling=RopeScalingConfig())
    return dataclasses.replace(cfg, attention_kind=cfg.attention_pattern[j])


@flax.struct.dataclass
class LayerContext:
    """Tensors that depend only on positions and segment ids, computed once per model call
    instead of once per layer. In a scanned stack they enter the loop as constants, so XLA
    materialises them once instead of recomputing sin/cos and the mask inside every layer."""

    rope_sin: jax.Array | None  # [B, L, 1, K/2]; None without RoPE (model.position_kind)
    rope_cos: jax.Array | None  # [B, L, 1, K/2]
    # Additive attention bias [B, 1, 1, L, S] (0 visible, float32 min hidden) and [B, 1, 1, L, 1]
    # 1.0 where the query sees at least one key. None in decode mode, where the cache decides.
    attention_bias: jax.Array | None = None
    query_has_keys: jax.Array | None = None
    prefix: jax.Array | None = None  # [B, L] prefix flags (prefix-LM), or None
    # Keys are the queries' own positions in order and the kind is causal: the fast paths may
    # skip the all-masked blocks above the diagonal.
    causal_self_attention: bool = flax.struct.field(pytree_node=False, default=False)


def layer_context(cfg: ModelConfig, segment_ids_BL, positions_BL, decode: bool, prefix_BL=None) -> LayerContext:
    sin = cos = None
    if POSITION_KINDS.get(cfg.position_kind).rotary:
        sin, cos = (ops.computed_once(t)
                    for t in rotary_sin_cos(positions_BL, cfg.head_size, cfg.rope_theta, cfg.rope_scaling))
    if decode:
        return LayerContext(sin, cos, prefix=prefix_BL)
    kind = ATTENTION_KINDS.get(cfg.attention_kind)
    B, L = segment_ids_BL.shape
    index_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    tokens = Tokens(segment_ids_BL, index_BL, prefix_BL)
    bias, has_keys = attention_bias(kind.mask(tokens, tokens, cfg))
    return LayerContext(sin, cos, bias, has_keys, prefix_BL, causal_self_attention=kind.causal)


def layer_contexts(cfg: ModelConfig, segment_ids_BL, positions_BL, decode: bool, prefix_BL=None):
    """One LayerContext per entry of model.attention_pattern (one in all without a pattern);
    entries with the same kind and RoPE base share theirs."""
    made, contexts = {}, []
    for j in range(pattern_period(cfg)):
        c = layer_config(cfg, j)
        key = (c.attention_kind, c.rope_theta, c.rope_scaling)
        if key not in made:
            made[key] = layer_context(c, segment_ids_BL, positions_BL, decode, prefix_BL)
        contexts.append(made[key])
    return tuple(contexts)


class Attention(nn.Module):
    """Grouped-query attention with RoPE, masked by `cfg.attention_kind`.

    With `decode=True` the layer keeps a 'cache' collection sized at init time (the length of the
    init input) and appends the keys/values of each call at `cache_index`, so prefill (a whole
    prompt) and decode (one token) are the same code path.
    """

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, positions_BL, context: LayerContext | None = None):
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        H, N, K, D = cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.d_model
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        w_q = self.param("q", dense_init(cfg.init_std, ("embed", "heads", "head_dim")), (D, H, K))
        w_k = self.param("k", dense_init(cfg.init_std, ("embed", "kv_heads", "head_dim")), (D, N, K))
        w_v = self.param("v", dense_init(cfg.init_std, ("embed", "kv_heads", "head_dim")), (D, N, K))
        w_o = self.param("o", dense_init(out_std, ("heads", "head_dim", "embed")), (H, K, D))
        b_o = (self.param("o_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (D,))
               if cfg.attn_out_bias else None)
        w_q, w_k, w_v, w_o = with_dropout_keys(self, w_q, w_k, w_v, w_o)  # LoRA; no-op for plain kernels
        if context is None:
            context = layer_context(cfg, segment_ids_BL, positions_BL, self.decode)

        # x W_q, x W_k, x W_v, query heads grouped by their KV head: q [B, L, N, G, K]; adapted
        # kernels add their adapters' terms to the fused projection's outputs.
        q_BLNGK, k_BLNK, v_BLNK = ops.qkv(x_BLD, *(unadapted(w) for w in (w_q, w_k, w_v)), dtype)
        q_BLNGK, k_BLNK, v_BLNK = (with_adapter(y, x_BLD, w, 1, dtype)
                                   for y, w in zip((q_BLNGK, k_BLNK, v_BLNK), (w_q, w_k, w_v)))
        if cfg.qkv_bias:
            b_q = self.param("q_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("heads", "head_dim")), (H, K))
            b_k, b_v = (self.param(f"{n}_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("kv_heads", "head_dim")),
                                   (N, K)) for n in ("k", "v"))
            q_BLNGK = q_BLNGK + b_q.reshape(N, H // N, K).astype(dtype)
            k_BLNK, v_BLNK = k_BLNK + b_k.astype(dtype), v_BLNK + b_v.astype(dtype)
        if cfg.qk_norm:  # per head, over its K channels, before the rotation
            q_BLNGK, k_BLNK = norm(cfg, "q_norm")(q_BLNGK), norm(cfg, "k_norm")(k_BLNK)
        sin, cos = context.rope_sin, context.rope_cos
        if sin is not None:
            q_BLNGK = apply_rotary(q_BLNGK, sin[..., None, :], cos[..., None, :])
            k_BLNK = apply_rotary(k_BLNK, sin, cos)

        scores = dict(scale=cfg.query_scale or None, softcap=cfg.attn_logit_softcap)
        if self.decode:
            out_BLNGK = self._attend_cached(q_BLNGK, k_BLNK, v_BLNK, segment_ids_BL, context.prefix)
        else:
            out_BLNGK = ops.attend(q_BLNGK, k_BLNK, v_BLNK, context.attention_bias,
                                   context.query_has_keys, context.causal_self_attention,
                                   cfg.attention_impl, segment_ids_BL, **scores)
        B, L = segment_ids_BL.shape
        out_BLHK = constrain(out_BLNGK.reshape(B, L, H, K), (BATCH, LENGTH, ACT_HEADS, None))
        out_BLD = ops.dense(out_BLHK, w_o, 2, dtype)  # Σ_hk out[b, l, h, k] W_o[h, k, d]
        if b_o is not None:
            out_BLD = out_BLD + b_o.astype(dtype)
        return constrain(out_BLD, (BATCH, LENGTH, ACT_EMBED))

    def _attend_cached(self, q_BLNGK, k_BLNK, v_BLNK, segment_ids_BL, prefix_BL):
        """Writes this call's keys and values into the cache at `index` (and advances it), then
        attends over the whole cache with the kind's mask at cache slots."""
        kind = ATTENTION_KINDS.get(self.cfg.attention_kind)
        B, L, N, K = k_BLNK.shape
        is_init = not self.has_variable("cache", "key")
        # At init the input length is the cache capacity (the longest sequence to be generated).
        kv_dtype = self.cfg.kv_cache_dtype
        int8 = kv_dtype == "int8"
        cache_dtype = k_BLNK.dtype if kv_dtype == "auto" else jnp.dtype(kv_dtype)
        cached_k = self.variable("cache", "key", jnp.zeros, ops.cache_shape(B, L, N, K), cache_dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, ops.cache_shape(B, L, N, K), cache_dtype)
        if int8:  # one scale per slot and KV head
            k_scale = self.variable("cache", "key_scale", jnp.ones, ops.cache_shape(B, L, N, 1), jnp.float32)
            v_scale = self.variable("cache", "value_scale", jnp.ones, ops.cache_shape(B, L, N, 1), jnp.float32)
        cached_seg = self.variable("cache", "segment_ids", jnp.zeros, (B, L), jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        q_index_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        if is_init:  # only the shapes matter
            tokens = Tokens(segment_ids_BL, q_index_BL, prefix_BL)
            return ops.attend(q_BLNGK, k_BLNK, v_BLNK, *attention_bias(kind.mask(tokens, tokens, self.cfg)),
                              causal_self=False, scale=self.cfg.query_scale or None, softcap=self.cfg.attn_logit_softcap)
        start = index.value
        scales = ()
        if int8:
            (k_BLNK, k_scale_BLN1), (v_BLNK, v_scale_BLN1) = ops.quantize_kv(k_BLNK), ops.quantize_kv(v_BLNK)
            k_scale.value = ops.update_cache(k_scale.value, k_scale_BLN1, start)
            v_scale.value = ops.update_cache(v_scale.value, v_scale_BLN1, start)
            scales = (k_scale.value, v_scale.value)
        cached_k.value = ops.update_cache(cached_k.value, k_BLNK, start)
        cached_v.value = ops.update_cache(cached_v.value, v_BLNK, start)
        # A cache whose index has one entry per row (continuous batching: rows at different
        # lengths) writes each row at its own slot; the usual one index writes all rows alike.
        cached_seg.value = ops.update_rows(cached_seg.value, segment_ids_BL.astype(jnp.int32), start)
        index.value = start + L
        S = cached_seg.value.shape[1]
        k_index_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        k_prefix_BS = None
        if prefix_BL is not None:
            # Keys written by earlier calls precede every query of this one, so only this call's
            # prefix flags change what is visible.
            k_prefix_BS = ops.update_rows(jnp.zeros((B, S), bool), prefix_BL, start)
        start_B1 = start[:, None] if jnp.ndim(start) == 1 else start
        mask_BLS = kind.mask(Tokens(segment_ids_BL, start_B1 + q_index_BL, prefix_BL),
                             Tokens(cached_seg.value, k_index_BS, k_prefix_BS), self.cfg)
        return ops.cached_attention(q_BLNGK, cached_k.value, cached_v.value, *attention_bias(mask_BLS), *scales,
                                    scale=self.cfg.query_scale or None, softcap=self.cfg.attn_logit_softcap)


# model.attention_layer: the module a block attends with, `Layer(cfg, decode=..., name="attn")`
# called as Attention is; the attention kind masks whichever it is (layers/mla.py adds "mla").
ATTENTION_LAYERS = Registry("model.attention_layer")
ATTENTION_LAYERS.register("gqa", Attention)
