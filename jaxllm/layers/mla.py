"""Multi-head latent attention (DeepSeek-V2, DeepSeek-V3), the attention layer "mla"
(model.attention_layer=mla, dimensions in model.mla).

    c_kv = norm(x W_kv_a[:, :C])        the token's KV latent          [C]
    k_r  = RoPE(x W_kv_a[:, C:])        one RoPE key for all heads     [R]
    k_h  = [c_kv W_uk_h, k_r],  v_h = c_kv W_uv_h                      (W_kv_b = [W_uk | W_uv])
    q_h  = [q_nope_h, RoPE(q_rope_h)] = norm(x W_q_a) W_q_b   (or x W_q without model.mla.q_lora_rank)
    out  = Σ_h softmax(q_h · k_h / sqrt(A + R) where mask) v_h W_o_h

(model.query_scale, where set, replaces 1 / sqrt(A + R): DeepSeek-V3 with YaRN multiplies it by
mscale(factor, mscale_all_dim)^2.)

Training expands the latent into per-head keys and values and runs the usual attention. The KV
cache holds only c_kv and k_r per token (C + R numbers against GQA's 2·N·K); decoding absorbs the
up-projections instead of expanding the cache: q_nope_h W_ukᵀ is a query in latent space, so the
scores are (q_nope_h W_ukᵀ) · c_kv + q_rope_h · k_r and the output is (probs · c_kv) W_uv_h, one
pass over the cache whatever the number of heads. (A quantized or adapted W_kv_b expands the
cache each step instead: same result, slower.) model.kv_cache_dtype=int8 stores the latent and
the RoPE key as int8 with one float32 scale per slot each.

Shape legend as in layers/base.py, plus C KV latent rank, Q query latent rank, A the per-head
dimension without RoPE, R the RoPE dimension, V the value head dimension.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import ops
from jaxllm.config import ModelConfig
from jaxllm.layers.attention import ATTENTION_KINDS, ATTENTION_LAYERS, LayerContext, Tokens, layer_context
from jaxllm.layers.base import RMSNorm, apply_rotary, compute_dtype, constrain, dense_init, rotary_sin_cos, with_dropout_keys
from jaxllm.ops.attention import attention_bias
from jaxllm.ops.projection import Adapted, is_quantized
from jaxllm.sharding import ACT_EMBED, ACT_HEADS, BATCH, LENGTH


def cache_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    """KV-cache bytes one token takes in one layer: the latent and the RoPE key."""
    return (cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim) * itemsize


def _masked_softmax(scores_BHLS, bias_B11LS, has_keys_B11L1):
    scores = scores_BHLS.astype(jnp.float32) + bias_B11LS[:, 0]
    probs = jax.nn.softmax(scores, axis=-1)
    return probs * has_keys_B11L1[:, 0]


class MultiHeadLatentAttention(nn.Module):
    """Called as layers.attention.Attention is; with `decode=True` its 'cache' collection holds the
    latents, the RoPE keys, the segment ids and the next slot."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, positions_BL, context: LayerContext | None = None):
        cfg, m = self.cfg, self.cfg.mla
        dtype = compute_dtype(cfg)
        H, D, C, A, R, V = cfg.num_heads, cfg.d_model, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        if m.q_lora_rank:
            w_q_a = self.param("q_a", dense_init(cfg.init_std, ("embed", None)), (D, m.q_lora_rank))
            w_q = self.param("q_b", dense_init(cfg.init_std, (None, "heads", "head_dim")), (m.q_lora_rank, H, A + R))
        else:
            w_q = self.param("q", dense_init(cfg.init_std, ("embed", "heads", "head_dim")), (D, H, A + R))
        w_kv_a = self.param("kv_a", dense_init(cfg.init_std, ("embed", None)), (D, C + R))
        w_kv_b = self.param("kv_b", dense_init(cfg.init_std, (None, "heads", "head_dim")), (C, H, A + V))
        w_o = self.param("o", dense_init(out_std, ("heads", "head_dim", "embed")), (H, V, D))
        w_q, w_kv_a, w_kv_b, w_o = with_dropout_keys(self, w_q, w_kv_a, w_kv_b, w_o)
        if context is None:
            context = layer_context(cfg, segment_ids_BL, positions_BL, self.decode)

        q_in = x_BLD
        if m.q_lora_rank:
            q_in = RMSNorm(cfg, name="q_norm")(ops.dense(x_BLD, w_q_a, 1, dtype))
        q_BLHK = constrain(ops.dense(q_in, w_q, 1, dtype), (BATCH, LENGTH, ACT_HEADS, None))
        kv_BLJ = ops.dense(x_BLD, w_kv_a, 1, dtype)
        latent_BLC = RMSNorm(cfg, name="kv_norm")(kv_BLJ[..., :C])
        # RoPE over the R rotary channels at the tokens' positions (this layer's own width).
        sin, cos = rotary_sin_cos(positions_BL, R, cfg.rope_theta, cfg.rope_scaling)
        k_rope_BLR = apply_rotary(kv_BLJ[..., None, C:], sin, cos)[:, :, 0]
        q_nope_BLHA = q_BLHK[..., :A]
        q_rope_BLHR = apply_rotary(q_BLHK[..., A:], sin, cos)

        if self.decode:
            out_BLHV = self._attend_cached(q_nope_BLHA, q_rope_BLHR, latent_BLC, k_rope_BLR, w_kv_b,
                                           segment_ids_BL, context.prefix)
        else:
            out_BLHV = self._attend_expanded(q_nope_BLHA, q_rope_BLHR, latent_BLC, k_rope_BLR, w_kv_b,
                                             context.attention_bias, context.query_has_keys,
                                             context.causal_self_attention, segment_ids_BL)
        out_BLHV = constrain(out_BLHV, (BATCH, LENGTH, ACT_HEADS, None))
        out_BLD = ops.dense(out_BLHV, w_o, 2, dtype)  # Σ_hv out[b, l, h, v] W_o[h, v, d]
        return constrain(out_BLD, (BATCH, LENGTH, ACT_EMBED))

    def _expand(self, latent_BSC, k_rope_BSR, w_kv_b):
        """Per-head keys [B, S, H, A + R] and values [B, S, H, V] from the latents."""
        A = self.cfg.mla.qk_nope_head_dim
        kv_BSHJ = constrain(ops.dense(latent_BSC, w_kv_b, 1, compute_dtype(self.cfg)), (BATCH, LENGTH, ACT_HEADS, None))
        k_rope_BSHR = jnp.broadcast_to(k_rope_BSR[:, :, None, :], (*kv_BSHJ.shape[:3], k_rope_BSR.shape[-1]))
        return jnp.concatenate([kv_BSHJ[..., :A], k_rope_BSHR.astype(kv_BSHJ.dtype)], axis=-1), kv_BSHJ[..., A:]

    def _attend_expanded(self, q_nope_BLHA, q_rope_BLHR, latent_BSC, k_rope_BSR, w_kv_b, bias, has_keys,
                         causal_self, segment_ids_BL, impl=None):
        """The usual attention over expanded keys and values, each head its own KV group (G = 1)."""
        k_BSHK, v_BSHV = self._expand(latent_BSC, k_rope_BSR, w_kv_b)
        q_BLH1K = jnp.concatenate([q_nope_BLHA, q_rope_BLHR.astype(q_nope_BLHA.dtype)], axis=-1)[:, :, :, None]
        # The fused kernels want one head dimension for q, k and v; MLA's values are narrower.
        impl = "xla" if v_BSHV.shape[-1] != k_BSHK.shape[-1] else self.cfg.attention_impl
        out = ops.attend(q_BLH1K, k_BSHK, v_BSHV, bias, has_keys, causal_self, impl, segment_ids_BL,
                         scale=self.cfg.query_scale or None)
        return out[:, :, :, 0]

    def _attend_cached(self, q_nope_BLHA, q_rope_BLHR, latent_BLC, k_rope_BLR, w_kv_b, segment_ids_BL, prefix_BL):
        """Writes this call's latents and RoPE keys at `index` (and advances it), then attends over
        the whole cache with the kind's mask at cache slots."""
        cfg = self.cfg
        kind = ATTENTION_KINDS.get(cfg.attention_kind)
        B, L, C = latent_BLC.shape
        is_init = not self.has_variable("cache", "latent")
        # At init the input length is the cache capacity (the longest sequence to be generated).
        int8 = cfg.kv_cache_dtype == "int8"
        latent_dtype, rope_dtype = ((latent_BLC.dtype, k_rope_BLR.dtype) if cfg.kv_cache_dtype == "auto"
                                    else (jnp.dtype(cfg.kv_cache_dtype),) * 2)
        cached_latent = self.variable("cache", "latent", jnp.zeros, (B, L, C), latent_dtype)
        cached_rope = self.variable("cache", "rope_key", jnp.zeros, k_rope_BLR.shape, rope_dtype)
        if int8:  # one scale per slot for the latent and one for the RoPE key
            latent_scale = self.variable("cache", "latent_scale", jnp.ones, (B, L, 1), jnp.float32)
            rope_scale = self.variable("cache", "rope_key_scale", jnp.ones, (B, L, 1), jnp.float32)
        cached_seg = self.variable("cache", "segment_ids", jnp.zeros, (B, L), jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        q_index_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        if is_init:  # only the shapes matter
            tokens = Tokens(segment_ids_BL, q_index_BL, prefix_BL)
            return self._attend_expanded(q_nope_BLHA, q_rope_BLHR, latent_BLC, k_rope_BLR, w_kv_b,
                                         *attention_bias(kind.mask(tokens, tokens, cfg)), False, segment_ids_BL)
        start = index.value
        rows = (BATCH, None, None)  # the latent is shared by the heads: split over the batch only

        # One write index per row (continuous batching: rows at different lengths) or one for all.
        def write(cached, new_BLX):
            cached.value = constrain(ops.update_rows(cached.value, new_BLX.astype(cached.value.dtype), start), rows)

        if int8:
            (latent_BLC, latent_scale_BL1), (k_rope_BLR, rope_scale_BL1) = (
                ops.quantize_kv(latent_BLC), ops.quantize_kv(k_rope_BLR))
            write(latent_scale, latent_scale_BL1)
            write(rope_scale, rope_scale_BL1)
        write(cached_latent, latent_BLC)
        write(cached_rope, k_rope_BLR)
        cached_seg.value = ops.update_rows(cached_seg.value, segment_ids_BL.astype(jnp.int32), start)
        index.value = start + L
        S = cached_seg.value.shape[1]
        k_index_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        k_prefix_BS = None
        if prefix_BL is not None:
            k_prefix_BS = ops.update_rows(jnp.zeros((B, S), bool), prefix_BL, start)
        start_B1 = start[:, None] if jnp.ndim(start) == 1 else start
        mask_BLS = kind.mask(Tokens(segment_ids_BL, start_B1 + q_index_BL, prefix_BL),
                             Tokens(cached_seg.value, k_index_BS, k_prefix_BS), cfg)
        bias, has_keys = attention_bias(mask_BLS)
        scales = (latent_scale.value, rope_scale.value) if int8 else (None, None)
        if isinstance(w_kv_b, Adapted) or is_quantized(w_kv_b):
            dtype = compute_dtype(cfg)
            latent_BSC, k_rope_BSR = (x.value.astype(jnp.float32) * (1.0 if sc is None else sc)
                                      for x, sc in zip((cached_latent, cached_rope), scales))
            return self._attend_expanded(q_nope_BLHA, q_rope_BLHR, latent_BSC.astype(dtype), k_rope_BSR.astype(dtype),
                                         w_kv_b, bias, has_keys, False, segment_ids_BL)
        return self._attend_absorbed(q_nope_BLHA, q_rope_BLHR, cached_latent.value, cached_rope.value, w_kv_b,
                                     bias, has_keys, *scales)

    def _attend_absorbed(self, q_nope_BLHA, q_rope_BLHR, latent_BSC, k_rope_BSR, w_kv_b, bias, has_keys,
                         latent_scale_BS1=None, rope_scale_BS1=None):
        """An int8 cache's per-slot scales multiply the scores and the probabilities, as in
        ops.cached_attention, so no dequantized copy of the cache is made."""
        m = self.cfg.mla
        dtype = compute_dtype(self.cfg)
        A = m.qk_nope_head_dim
        w_kv_b = w_kv_b.astype(dtype)
        w_uk_CHA, w_uv_CHV = w_kv_b[..., :A], w_kv_b[..., A:]
        scale = self.cfg.query_scale or 1.0 / math.sqrt(A + m.qk_rope_head_dim)
        per_slot = lambda s_BS1: 1.0 if s_BS1 is None else s_BS1[:, None, None, :, 0]  # noqa: E731  [B, 1, 1, S]
        q_latent_BLHC = jnp.einsum("blha,cha->blhc", q_nope_BLHA, w_uk_CHA)
        latent_scores = jnp.einsum("blhc,bsc->bhls", q_latent_BLHC, latent_BSC.astype(dtype)) * per_slot(latent_scale_BS1)
        rope_scores = (jnp.einsum("blhr,bsr->bhls", q_rope_BLHR.astype(dtype), k_rope_BSR.astype(dtype))
                       * per_slot(rope_scale_BS1))
        probs_BHLS = _masked_softmax((latent_scores + rope_scores) * scale, bias, has_keys)
        probs_BHLS = (probs_BHLS * per_slot(latent_scale_BS1)).astype(dtype)
        out_latent_BLHC = jnp.einsum("bhls,bsc->blhc", probs_BHLS, latent_BSC.astype(dtype))
        return jnp.einsum("blhc,chv->blhv", out_latent_BLHC, w_uv_CHV)


ATTENTION_LAYERS.register("mla", MultiHeadLatentAttention)
