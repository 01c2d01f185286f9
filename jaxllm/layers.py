"""Transformer building blocks: embedding, RMSNorm, rotary embedding, attention, SwiGLU MLP.

Shape legend: B batch, L query length, S key length, D model width, H query heads, G query heads
per KV head, N KV heads, K head dim, F MLP width, V vocab.

Parameters are float32 and carry logical axis names; `sharding.LOGICAL_RULES` maps those names
onto mesh axes. Matmuls run in the configured compute dtype; softmax and norms in float32.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig

# Logical names of activations (parameter names are "vocab", "embed", "heads", "kv_heads",
# "head_dim", "mlp", "layers"). Kept distinct so a rule can shard a weight without sharding the
# activation dimension of the same size, and vice versa.
BATCH, LENGTH, ACT_EMBED = "batch", "act_length", "act_embed"
ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = "act_heads", "act_kv_heads", "act_mlp", "act_vocab"


KNOBS = dict(no_rope=False, no_attn_core=False, no_silu=False, fuse_qkv=False, fuse_gate_up=False, onehot_embed=False, fast_softmax=False, mha_4d=False)


def compute_dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


def constrain(x, names):
    return nn.with_logical_constraint(x, names)


def dense_init(std: float, names: tuple[str, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


class Embed(nn.Module):
    cfg: ModelConfig

    def setup(self):
        self.embedding = self.param(
            "embedding", dense_init(self.cfg.init_std, ("vocab", "embed")),
            (self.cfg.vocab_size, self.cfg.d_model), jnp.float32,
        )

    def __call__(self, tokens_BL):
        # Gather from a replicated table: a lookup into a vocab-sharded table makes XLA replicate
        # the gathered activations instead, which costs more than all-gathering the table once.
        table_VD = constrain(self.embedding, (None, None))
        if KNOBS['onehot_embed']:
            onehot = jax.nn.one_hot(tokens_BL, table_VD.shape[0], dtype=table_VD.dtype)
            x_BLD = jnp.einsum("blv,vd->bld", onehot, table_VD).astype(compute_dtype(self.cfg))
        else:
            x_BLD = jnp.take(table_VD, tokens_BL, axis=0).astype(compute_dtype(self.cfg))
        return constrain(x_BLD, (BATCH, LENGTH, ACT_EMBED))

    def attend(self, x_BLD):
        """Tied output projection: logits against the embedding table."""
        table_VD = self.embedding.astype(x_BLD.dtype)
        return jnp.einsum("bld,vd->blv", x_BLD, table_VD)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],), jnp.float32,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x32 * scale).astype(x.dtype)


def rotary_sin_cos(positions_BL, head_dim, theta):
    half = head_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BLK = positions_BL[..., None].astype(jnp.float32) * inv_freq
    return jnp.sin(angles_BLK)[:, :, None, :], jnp.cos(angles_BLK)[:, :, None, :]


def rotary_embedding(x_BLNK, positions_BL, theta: float, sin_cos=None):
    """Rotates channel pairs (i, i + K/2) by position-dependent angles (RoPE, rotate-half form)."""
    sin, cos = sin_cos if sin_cos is not None else rotary_sin_cos(positions_BL, x_BLNK.shape[-1], theta)
    x1, x2 = jnp.split(x_BLNK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BLNK.dtype)


def attention_mask(q_segment_BL, k_segment_BS, q_index_BL, k_index_BS):
    """True where query may attend key: same document, key not in the future, key not padding."""
    same_doc = q_segment_BL[:, :, None] == k_segment_BS[:, None, :]
    causal = q_index_BL[:, :, None] >= k_index_BS[:, None, :]
    not_pad = (k_segment_BS != 0)[:, None, :]
    return same_doc & causal & not_pad


def attention_bias(mask_BLS):
    return jnp.where(mask_BLS, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)[:, None, None]


def fast_attention(q_BLNGK, k_BSNK, v_BSNK, bias_B11LS, valid_B11L1):
    scale = 1.0 / math.sqrt(q_BLNGK.shape[-1])
    scores = jnp.einsum("blngk,bsnk->bngls", q_BLNGK * jnp.asarray(scale, q_BLNGK.dtype), k_BSNK)
    scores = scores.astype(jnp.float32) + bias_B11LS
    e = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    probs = e * (valid_B11L1 / jnp.sum(e, axis=-1, keepdims=True))
    return jnp.einsum("bngls,bsnk->blngk", probs.astype(v_BSNK.dtype), v_BSNK)


def dot_product_attention(q_BLNGK, k_BSNK, v_BSNK, mask_BLS):
    scale = 1.0 / math.sqrt(q_BLNGK.shape[-1])
    scores = jnp.einsum("blngk,bsnk->bngls", q_BLNGK * jnp.asarray(scale, q_BLNGK.dtype), k_BSNK)
    scores = scores.astype(jnp.float32)
    scores = jnp.where(mask_BLS[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    # Rows with no visible key (padding queries) would average garbage; zero them instead.
    probs = jnp.where(mask_BLS[:, None, None].any(-1, keepdims=True), probs, 0.0)
    return jnp.einsum("bngls,bsnk->blngk", probs.astype(v_BSNK.dtype), v_BSNK)


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads, RoPE and an optional KV cache.

    With `decode=True` the layer keeps a 'cache' collection sized at init time (the length of the
    init input) and appends the keys/values of each call at `cache_index`, so prefill (a whole
    prompt) and decode (one token) are the same code path.
    """

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, positions_BL, sin_cos=None, bias=None):
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        H, N, K, D = cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.d_model
        G = H // N
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        w_q = self.param("q", dense_init(cfg.init_std, ("embed", "heads", "head_dim")), (D, H, K))
        w_k = self.param("k", dense_init(cfg.init_std, ("embed", "kv_heads", "head_dim")), (D, N, K))
        w_v = self.param("v", dense_init(cfg.init_std, ("embed", "kv_heads", "head_dim")), (D, N, K))
        w_o = self.param("o", dense_init(out_std, ("heads", "head_dim", "embed")), (H, K, D))

        x_BLD = x_BLD.astype(dtype)
        if KNOBS['fuse_qkv']:
            w_qkv = jnp.concatenate(
                [w_q.reshape(D, N, G, K), w_k[:, :, None], w_v[:, :, None]], axis=2).astype(dtype)
            qkv = jnp.einsum("bld,dnjk->blnjk", x_BLD, w_qkv)
            B_, L_ = x_BLD.shape[:2]
            q_BLHK = qkv[:, :, :, :G].reshape(B_, L_, H, K)
            k_BLNK = qkv[:, :, :, G]
            v_BLNK = qkv[:, :, :, G + 1]
        else:
            q_BLHK = jnp.einsum("bld,dhk->blhk", x_BLD, w_q.astype(dtype))
            k_BLNK = jnp.einsum("bld,dnk->blnk", x_BLD, w_k.astype(dtype))
            v_BLNK = jnp.einsum("bld,dnk->blnk", x_BLD, w_v.astype(dtype))
        q_BLHK = constrain(q_BLHK, (BATCH, LENGTH, ACT_HEADS, None))
        k_BLNK = constrain(k_BLNK, (BATCH, LENGTH, ACT_KV_HEADS, None))
        v_BLNK = constrain(v_BLNK, (BATCH, LENGTH, ACT_KV_HEADS, None))
        if not KNOBS['no_rope']:
            q_BLHK = rotary_embedding(q_BLHK, positions_BL, cfg.rope_theta, sin_cos)
            k_BLNK = rotary_embedding(k_BLNK, positions_BL, cfg.rope_theta, sin_cos)

        B, L = segment_ids_BL.shape
        if self.decode:
            k_BSNK, v_BSNK, k_segment_BS, q_index_BL, k_index_BS = self._update_cache(
                k_BLNK, v_BLNK, segment_ids_BL
            )
        else:
            k_BSNK, v_BSNK, k_segment_BS = k_BLNK, v_BLNK, segment_ids_BL
            q_index_BL = k_index_BS = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        q_BLNGK = q_BLHK.reshape(B, L, N, G, K)
        if KNOBS['no_attn_core']:
            out_BLNGK = q_BLNGK * k_BSNK[:, :, :, None] * v_BSNK[:, :, :, None]
        elif KNOBS['fast_softmax']:
            if bias is None:
                mask_BLS = attention_mask(segment_ids_BL, k_segment_BS, q_index_BL, k_index_BS)
                bias = (attention_bias(mask_BLS), mask_BLS.any(-1)[:, None, None, :, None].astype(jnp.float32))
            out_BLNGK = fast_attention(q_BLNGK, k_BSNK, v_BSNK, *bias)
        else:
            mask_BLS = attention_mask(segment_ids_BL, k_segment_BS, q_index_BL, k_index_BS)
            out_BLNGK = dot_product_attention(q_BLNGK, k_BSNK, v_BSNK, mask_BLS)
        out_BLHK = constrain(out_BLNGK.reshape(B, L, H, K), (BATCH, LENGTH, ACT_HEADS, None))
        out_BLD = jnp.einsum("blhk,hkd->bld", out_BLHK, w_o.astype(dtype))
        return constrain(out_BLD, (BATCH, LENGTH, ACT_EMBED))

    def _update_cache(self, k_BLNK, v_BLNK, segment_ids_BL):
        B, L, N, K = k_BLNK.shape
        is_init = not self.has_variable("cache", "key")
        # At init the input length is the cache capacity (the longest sequence to be generated).
        cached_k = self.variable("cache", "key", jnp.zeros, (B, L, N, K), k_BLNK.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, (B, L, N, K), v_BLNK.dtype)
        cached_seg = self.variable("cache", "segment_ids", jnp.zeros, (B, L), jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        S = cached_k.value.shape[1]
        k_index_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        if is_init:
            q_index_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
            return k_BLNK, v_BLNK, segment_ids_BL, q_index_BL, k_index_BS[:, :L]
        start = index.value
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k_BLNK, (0, start, 0, 0))
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v_BLNK, (0, start, 0, 0))
        cached_seg.value = jax.lax.dynamic_update_slice(
            cached_seg.value, segment_ids_BL.astype(jnp.int32), (0, start)
        )
        index.value = start + L
        q_index_BL = start + jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        return cached_k.value, cached_v.value, cached_seg.value, q_index_BL, k_index_BS


ATTENTION_KINDS: dict[str, type[nn.Module]] = {"dot_product": Attention}


class Mlp(nn.Module):
    """SwiGLU feed-forward: (silu(x W_gate) * x W_up) W_down."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD):
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        D, F = cfg.d_model, cfg.mlp_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        w_gate = self.param("gate", dense_init(cfg.init_std, ("embed", "mlp")), (D, F))
        w_up = self.param("up", dense_init(cfg.init_std, ("embed", "mlp")), (D, F))
        w_down = self.param("down", dense_init(out_std, ("mlp", "embed")), (F, D))
        x_BLD = x_BLD.astype(dtype)
        if KNOBS['fuse_gate_up']:
            w = jnp.stack([w_gate, w_up], axis=1).astype(dtype)
            gu = jnp.einsum("bld,djf->bljf", x_BLD, w)
            gate_BLF, up_BLF = gu[:, :, 0], gu[:, :, 1]
        else:
            gate_BLF = jnp.einsum("bld,df->blf", x_BLD, w_gate.astype(dtype))
            up_BLF = jnp.einsum("bld,df->blf", x_BLD, w_up.astype(dtype))
        h_BLF = constrain((gate_BLF if KNOBS['no_silu'] else nn.silu(gate_BLF)) * up_BLF, (BATCH, LENGTH, ACT_MLP))
        out_BLD = jnp.einsum("blf,fd->bld", h_BLF, w_down.astype(dtype))
        return constrain(out_BLD, (BATCH, LENGTH, ACT_EMBED))
