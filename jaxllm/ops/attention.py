"""Attention fast paths: softmax attention with an additive bias (skipping the future blocks of
causal self-attention), cuDNN's fused kernel, and attention over a KV cache laid out for XLA:CPU.

Every function here computes plain masked softmax attention,
    out[b, l, h] = softmax_s(q[b, l, h] · k[b, s, h'] / sqrt(K) where mask[b, l, s]) · v[b, s, h'],
with h' the KV head of query head h; only how it is computed depends on the backend. `scale`
replaces 1/sqrt(K) and `softcap` c > 0 bounds the scores to c·tanh(scores / c) before the mask
(Gemma 2); both default to plain attention.

Shape legend: B batch, L query length, S key length, N KV heads, G query heads per KV head,
K head dim, X cache rows (B·N).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.ops.splash import splash_attention, supported as splash_supported
from jaxllm.ops.projection import dense, map_kernels
from jaxllm.sharding import ACT_KV_HEADS, BATCH, LENGTH, target_platform

# Causal self-attention splits the queries into this many blocks, each attending only to keys up
# to its own end: 1/2 + 1/(2·blocks) of the full score matrix (62.5% at 4), with the same result,
# since the skipped keys are all in the future. More blocks means smaller, less efficient matmuls.
CAUSAL_QUERY_BLOCKS = 4
MIN_QUERY_BLOCK = 32


def qkv(x_BLD, w_q_DHK, w_k_DNK, w_v_DNK, dtype):
    """x W_q [B, L, N, G, K], x W_k and x W_v [B, L, N, K] as one matmul.

    Three narrow matmuls each re-read x and run well below the matmul peak on CPU. The weights are
    concatenated per step (cheap next to the matmul), so the parameters stay separate. Per KV head
    n the fused kernel holds its G query heads, then k, then v, so tensor sharding over kv_heads
    keeps each group on one shard."""
    N, K = jax.tree.leaves(w_k_DNK)[0].shape[-2:]  # the int8 values of a quantized kernel come first
    w_qkv_DNJK = map_kernels(
        lambda q, k, v: jnp.concatenate([q.reshape(q.shape[0], N, -1, K), k[:, :, None], v[:, :, None]], axis=2),
        w_q_DHK, w_k_DNK, w_v_DNK,
    )
    qkv_BLNJK = dense(x_BLD, w_qkv_DNJK, 1, dtype, ("embed", "kv_heads", None, "head_dim"))
    qkv_BLNJK = nn.with_logical_constraint(qkv_BLNJK, (BATCH, LENGTH, ACT_KV_HEADS, None, None))
    G = qkv_BLNJK.shape[3] - 2
    # split, not three slices: its gradient is one concatenate, where the slices' gradients
    # are each padded to the full width and summed (two extra passes over [B, L, N, G+2, K]).
    q_BLNGK, k_BLN1K, v_BLN1K = jnp.split(qkv_BLNJK, [G, G + 1], axis=3)
    return q_BLNGK, k_BLN1K[:, :, :, 0], v_BLN1K[:, :, :, 0]


def computed_once(x):
    """x unchanged, but computed once instead of inside each consumer.

    XLA:CPU fuses elementwise producers into every consumer, so RoPE's sin and cos would be
    re-evaluated for each element of q and k in every layer (two transcendentals per element, ~6%
    of a d512 step). A matmul is never fused into its consumers, and one by the identity is exact
    (x·1 plus zeros), so it makes XLA keep the result in a buffer. Accelerators compute these
    fusions cheaply enough that the extra matmul is not worth it there."""
    if target_platform() != "cpu":
        return x
    return jnp.einsum("...k,kj->...j", x, jnp.eye(x.shape[-1], dtype=x.dtype))


def attention_bias(mask_BLS):
    """(additive bias [B, 1, 1, L, S], query-has-keys [B, 1, 1, L, 1]) from a boolean mask.

    Adding the bias is one fused add where a select would be a separate pass over the scores in
    the forward and the backward; the float32 minimum (not -inf) keeps rows with no visible key
    finite, and multiplying by query-has-keys zeroes them as the masked softmax would."""
    bias = jnp.where(mask_BLS, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
    has_keys = jnp.any(mask_BLS, axis=-1, keepdims=True).astype(jnp.float32)
    return bias[:, None, None], has_keys[:, None, None]


def _masked_softmax(scores, bias, has_keys):
    """float32 softmax over the last axis (the keys) of scores plus the additive bias; rows
    without keys come out zero. `bias` and `has_keys` broadcast against the scores' layout."""
    scores = scores.astype(jnp.float32) + bias
    # The max only keeps exp() in range; its gradient cancels, so none is computed for it.
    unnormalised = jnp.exp(scores - jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True)))
    # Normalising and zeroing rows without keys are one multiply of the [.., L, S] tensor.
    return unnormalised * (has_keys / jnp.sum(unnormalised, axis=-1, keepdims=True))


def _softcap(scores, softcap: float):
    if not softcap:
        return scores
    scores = scores.astype(jnp.float32)
    return softcap * jnp.tanh(scores / softcap)


def _attend(q_BLNGK, k_BSNK, v_BSNK, bias_B11LS, has_keys_B11L1, scale=None, softcap=0.0):
    # Scores are laid out [B, N, L, G, S], the order in which the matmul produces them (batch
    # axes, then the query's free axes as they lie in q): as [B, N, G, L, S] XLA:CPU copied every
    # block's scores into a transposed buffer before the softmax (d512 step 2% slower).
    scale = 1.0 / math.sqrt(q_BLNGK.shape[-1]) if scale is None else scale
    scores = jnp.einsum("blngk,bsnk->bnlgs", q_BLNGK * jnp.asarray(scale, q_BLNGK.dtype), k_BSNK)
    scores = _softcap(scores, softcap)
    probs = _masked_softmax(scores, jnp.swapaxes(bias_B11LS, 2, 3), jnp.swapaxes(has_keys_B11L1, 2, 3))
    return jnp.einsum("bnlgs,bsnk->blngk", probs.astype(v_BSNK.dtype), v_BSNK)


def dot_product_attention(q_BLNGK, k_BSNK, v_BSNK, bias_B11LS, has_keys_B11L1, causal_self=False,
                          blocks=CAUSAL_QUERY_BLOCKS, scale=None, softcap=0.0):
    """Softmax attention with an additive bias; `causal_self` promises that key i is query i's
    position and that the bias hides every future key, which lets the queries be split into
    `blocks` blocks that each skip the keys after their own end."""
    L, S = q_BLNGK.shape[1], k_BSNK.shape[1]
    if not causal_self or L != S or L % blocks or L // blocks < MIN_QUERY_BLOCK:
        return _attend(q_BLNGK, k_BSNK, v_BSNK, bias_B11LS, has_keys_B11L1, scale, softcap)
    size = L // blocks
    outs = []
    for i in range(blocks):
        lo, hi = i * size, (i + 1) * size
        outs.append(_attend(q_BLNGK[:, lo:hi], k_BSNK[:, :hi], v_BSNK[:, :hi],
                            bias_B11LS[..., lo:hi, :hi], has_keys_B11L1[..., lo:hi, :], scale, softcap))
    return jnp.concatenate(outs, axis=1)


def fused_attention(q_BLNGK, k_BSNK, v_BSNK, bias_B11LS, has_keys_B11L1, implementation="cudnn"):
    """Causal self-attention through cuDNN's fused (flash) kernel: the same function as
    `dot_product_attention(..., causal_self=True)`, without the [L, S] scores in memory.

    The kernel applies the causal mask itself and skips the blocks above the diagonal; the
    document and padding structure comes in as a boolean mask (cuDNN turns it into a large
    negative bias). A query with no visible key (padding) gets the kernel's uniform average, so it
    is zeroed afterwards, as the XLA path's masked softmax does. `implementation="xla"` runs the
    same wrapper through jax's reference attention (how it is tested without a GPU)."""
    B, L, N, G, K = q_BLNGK.shape
    mask_B1LS = bias_B11LS[:, 0] == 0
    out_BLHK = jax.nn.dot_product_attention(
        q_BLNGK.reshape(B, L, N * G, K), k_BSNK, v_BSNK, mask=mask_B1LS, is_causal=True,
        implementation=implementation,
    )
    has_keys_BL11 = has_keys_B11L1[:, 0, 0, :, :, None].astype(out_BLHK.dtype)
    return (out_BLHK * has_keys_BL11).reshape(B, L, N, G, K)


def resolve_impl(impl: str, dtype, L: int, K: int) -> str:
    """The kernel causal self-attention runs on: `impl` itself, or for "auto" the target
    platform's fused kernel where it takes these shapes (splash on TPU, cuDNN on GPU in half
    precision), else XLA's."""
    if impl != "auto":
        return impl
    platform = target_platform()
    if platform == "tpu" and splash_supported(L, K):
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def attend(q_BLNGK, k_BSNK, v_BSNK, bias_B11LS, has_keys_B11L1, causal_self: bool, impl: str = "xla",
           segment_ids_BL=None, scale=None, softcap=0.0):
    """Masked softmax attention by `impl` ("xla", "cudnn", "splash" or "auto"). `causal_self`
    promises causal self-attention (keys are the queries' own positions, no future key visible,
    documents apart by `segment_ids_BL`): the only case the fused kernels and the block skipping
    handle. The fused kernels take neither another scale nor soft-capped scores: with those,
    "auto" is XLA's (validation refuses an explicit kernel)."""
    if scale is not None or softcap:
        impl = "xla"
    if causal_self:
        impl = resolve_impl(impl, q_BLNGK.dtype, q_BLNGK.shape[1], q_BLNGK.shape[-1])
        if impl == "cudnn":
            return fused_attention(q_BLNGK, k_BSNK, v_BSNK, bias_B11LS, has_keys_B11L1)
        if impl == "splash":
            return splash_attention(q_BLNGK, k_BSNK, v_BSNK, segment_ids_BL)
    return dot_product_attention(q_BLNGK, k_BSNK, v_BSNK, bias_B11LS, has_keys_B11L1, causal_self=causal_self,
                                 scale=scale, softcap=softcap)


# ---------------------------------------------------------------------------------------------
# KV cache
#
# Keys and values are cached as [B·N, S, K], one row per (batch, KV head) pair, and the attention
# reads the updated arrays in exactly that shape. Then, with the cache donated (as
# `decoding.Generator` does), XLA writes the new entries in place and the matmuls read the cache
# where it lies. A [B, S, N, K] cache was transposed for the matmuls, a copy of the whole cache in
# every layer at every step; so was [B, N, S, K] at batch 1, whose unit axis XLA drops (any
# reshape between the update and its reader makes XLA duplicate the update, each copy with its
# own whole-cache buffer).


def cache_shape(B: int, S: int, N: int, K: int) -> tuple[int, int, int]:
    return (B * N, S, K)


def _constrain_cache(x_XSK):
    """Shards a [B·N, S, K] cache array as [B, N, S, K] would be (batch over the batch axes, KV
    heads over tensor): its rows over all of those mesh axes, batch axes major."""
    rules = nn.get_logical_axis_rules()
    if not rules:
        return x_XSK
    row_axes = []
    for axes in nn.logical_to_mesh_axes((BATCH, ACT_KV_HEADS), rules):
        row_axes += [] if axes is None else [axes] if isinstance(axes, str) else list(axes)
    cache_rows = "kv_cache_rows"  # a logical name for just this call
    return nn.with_logical_constraint(
        x_XSK, (cache_rows, LENGTH, None), rules=(*rules, (cache_rows, tuple(row_axes) or None))
    )


KV_INT8_MAX = 127


def quantize_kv(x_BLNK):
    """(int8 values, float32 scales [B, L, N, 1]) of keys or values: symmetric, one scale per token
    and KV head (max |x| over the head dim / 127); |dequantized - x| <= scale / 2."""
    amax = jnp.max(jnp.abs(x_BLNK.astype(jnp.float32)), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / KV_INT8_MAX, 1.0)
    values = jnp.clip(jnp.round(x_BLNK / scale), -KV_INT8_MAX, KV_INT8_MAX).astype(jnp.int8)
    return values, scale


def update_cache(cache_XSK, new_BLNK, start):
    """The cache with `new` written at slots start .. start + L (converted to the cache's dtype);
    `start` is one slot for all rows, or [B] one per row (continuous batching)."""
    B, L, N, K = new_BLNK.shape
    new_XLK = jnp.swapaxes(new_BLNK, 1, 2).reshape(B * N, L, K).astype(cache_XSK.dtype)
    # Sharded like the keys and values themselves, so a sharded step never gathers it.
    return _constrain_cache(update_rows(cache_XSK, new_XLK, jnp.repeat(start, N) if jnp.ndim(start) == 1 else start))


def update_rows(x_BS, new_BL, start):
    """x with new_BL written along axis 1 at slot `start`: one slot for every row, or [B] each row
    b's new_BL[b] at its own slot start[b] (continuous batching)."""
    if jnp.ndim(start) == 0:
        return jax.lax.dynamic_update_slice(x_BS, new_BL, (0, start) + (0,) * (x_BS.ndim - 2))
    write = lambda row, new, start: jax.lax.dynamic_update_slice(row, new, (start,) + (0,) * (row.ndim - 1))  # noqa: E731
    return jax.vmap(write)(x_BS, new_BL, start)


def cached_attention(q_BLNGK, k_XSK, v_XSK, bias_B11LS, has_keys_B11L1, k_scale_XS1=None, v_scale_XS1=None,
                     scale=None, softcap=0.0):
    """`attention` over a KV cache whose rows are the (batch, KV head) pairs: X = B·N, b-major.

    An int8 cache comes with its per-slot scales (`quantize_kv`): they multiply the scores (keys)
    and the probabilities (values) rather than the cache, so no dequantized copy of the whole
    cache is made."""
    B, L, N, G, K = q_BLNGK.shape
    S = k_XSK.shape[1]
    dtype = q_BLNGK.dtype
    scale = jnp.asarray(1.0 / math.sqrt(K) if scale is None else scale, dtype)
    q_XMK = jnp.transpose(q_BLNGK * scale, (0, 2, 3, 1, 4)).reshape(B * N, G * L, K)  # M = G·L
    k_scale_X1S, v_scale_X1S = (None if s is None else jnp.swapaxes(s, 1, 2) for s in (k_scale_XS1, v_scale_XS1))

    def attend(q_XmK, m):  # m = G'·L query rows per cache row
        scores_XmS = jnp.einsum("xmk,xsk->xms", q_XmK, k_XSK.astype(dtype))
        if k_scale_X1S is not None:
            scores_XmS = scores_XmS * k_scale_X1S
        scores_XmS = _softcap(scores_XmS, softcap)
        probs = _masked_softmax(scores_XmS.reshape(B, N, m // L, L, S), bias_B11LS, has_keys_B11L1)
        probs_XmS = probs.reshape(B * N, m, S)
        if v_scale_X1S is not None:
            probs_XmS = probs_XmS * v_scale_X1S
        return jnp.einsum("xms,xsk->xmk", probs_XmS.astype(dtype), v_XSK.astype(dtype))

    if L == 1 and G > 1 and target_platform() == "cpu":
        # XLA:CPU runs a batched [1, K]·[K, S] product on a fast matrix-vector path, and any
        # M > 1 through a GEMM that packs the cache first (M = 2 took 3× as long per step at 640
        # slots); one product per query head of the group reads the cache G times and is faster.
        out_XMK = jnp.concatenate([attend(q_XMK[:, g:g + 1], 1) for g in range(G)], axis=1)
    else:
        out_XMK = attend(q_XMK, G * L)
    return jnp.transpose(out_XMK.reshape(B, N, G, L, K), (0, 3, 1, 2, 4))
