"""Transformer building blocks: embedding, RMSNorm, rotary embedding, attention, SwiGLU MLP.

Shape legend: B batch, L query length, S key length, D model width, H query heads, G query heads
per KV head, N KV heads, K head dim, F MLP width, V vocab, T tokens (B·L flattened).

Parameters are float32 and carry logical axis names; `sharding.LOGICAL_RULES` maps those names
onto mesh axes. Matmuls run in the configured compute dtype; softmax and norms in float32.
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

from jaxllm.config import ModelConfig

# Logical names of activations (parameter names are "vocab", "embed", "heads", "kv_heads",
# "head_dim", "mlp", "layers"). Kept distinct so a rule can shard a weight without sharding the
# activation dimension of the same size, and vice versa.
BATCH, LENGTH, ACT_EMBED = "batch", "act_length", "act_embed"
ACT_HEADS, ACT_KV_HEADS, ACT_MLP, ACT_VOCAB = "act_heads", "act_kv_heads", "act_mlp", "act_vocab"

# Name of every weight-projection output, for remat policies (see model.REMAT_POLICIES): the
# projections run inside a custom VJP, where a policy that looks for dot_general cannot see them.
PROJECTION = "projection"


def compute_dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


def constrain(x, names):
    return nn.with_logical_constraint(x, names)


def dense_init(std: float, names: tuple[str, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


# ---------------------------------------------------------------------------------------------
# Weight projections


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
    transposed = jax.lax.optimization_barrier if jax.default_backend() == "cpu" else (lambda a: a)
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
    lead, inner = x.shape[: x.ndim - contract], x.shape[x.ndim - contract:]
    out = w.shape[contract:]
    y = _matmul_TD_DF(x.reshape(-1, math.prod(inner)), w.reshape(math.prod(inner), -1))
    return checkpoint_name(y.reshape(*lead, *out), PROJECTION)


# ---------------------------------------------------------------------------------------------
# Kernels that may be int8-quantized (see jaxllm.quantize)
#
# A quantized kernel is a dict {"int8": values, "scale": float32 scales} stored under the kernel's
# own parameter name. The scale keeps the kernel's rank with size 1 on the contracting axes (one
# scale per output channel), so any reshape, concatenation or stacking along output axes that is
# written without hard-coding the contracting sizes applies to values and scales alike. A plain
# dict (not a custom pytree class) is what orbax and flax handle without registration; the key
# "int8" sorts before "scale", so flax's shape check of `self.param` (which compares the first
# leaf with the initializer's shape) sees the values.
QUANTIZED_VALUES, QUANTIZED_SCALE = "int8", "scale"


def is_quantized(w) -> bool:
    return isinstance(w, Mapping) and QUANTIZED_VALUES in w


def map_kernels(fn: Callable, *kernels):
    """`fn(*kernels)` for float kernels; for quantized ones, fn on the values and on the scales.

    `fn` must only rearrange output axes (and must not assume the contracting axes' sizes), e.g.
    `lambda a: a.reshape(a.shape[0], N, G, K)` rather than `a.reshape(D, N, G, K)`."""
    kinds = {is_quantized(k) for k in kernels}
    if len(kinds) > 1:
        raise ValueError("cannot combine float and int8-quantized kernels in one projection")
    if kinds == {True}:
        return {part: fn(*(k[part] for k in kernels)) for part in (QUANTIZED_VALUES, QUANTIZED_SCALE)}
    return fn(*kernels)


def project_kernel(x, w, contract: int, dtype, names: tuple | None = None):
    """`project(x, w, contract)` in `dtype` for a float or int8-quantized kernel `w`; `names` are
    the logical names of w's axes to constrain it to (None: no constraint).

    A quantized kernel is converted to `dtype` inside the computation (no float copy outlives the
    call) and its per-output-channel scale multiplies the matmul's output, which is the same as
    scaling the kernel since the scale is constant along the contracted axes. The int8 values are
    constrained before the conversion, so resharding moves a quarter of the float bytes."""
    if not is_quantized(w):
        kernel = w.astype(dtype)
        return project(x.astype(dtype), kernel if names is None else constrain(kernel, names), contract)
    values = w[QUANTIZED_VALUES]
    if names is not None:
        values = constrain(values, names)
    # Tied to x, the conversion runs just before its matmul. Otherwise XLA hoists every layer's
    # conversion (it depends on the params alone) to the start of the step, so all the float
    # copies are live at once and have left the cache by the time their matmul reads them.
    x, values = jax.lax.optimization_barrier((x, values))
    y = project(x.astype(dtype), values.astype(dtype), contract)
    scale = w[QUANTIZED_SCALE].reshape(values.shape[contract:]).astype(dtype)
    return y * scale


# ---------------------------------------------------------------------------------------------
# Per-call context shared by all layers


@flax.struct.dataclass
class LayerContext:
    """Tensors that depend only on positions and segment ids, computed once per model call
    instead of once per layer. In a scanned stack they enter the loop as constants, so XLA
    materialises them once instead of recomputing sin/cos and the mask inside every layer."""

    rope_sin: jax.Array  # [B, L, 1, K/2]
    rope_cos: jax.Array  # [B, L, 1, K/2]
    # Additive attention bias [B, 1, 1, L, S] (0 visible, float32 min hidden) and [B, 1, 1, L, 1]
    # 1.0 where the query sees at least one key. None in decode mode, where the cache decides.
    attention_bias: jax.Array | None = None
    query_has_keys: jax.Array | None = None
    # Keys are the queries' own positions in order (training, plain forward): the causal structure
    # is known statically and attention can skip the all-masked blocks above the diagonal.
    causal_self_attention: bool = flax.struct.field(pytree_node=False, default=False)


def _computed_once(x_BLNK):
    """x unchanged, but computed once instead of inside each consumer.

    XLA:CPU fuses elementwise producers into every consumer, so RoPE's sin and cos would be
    re-evaluated for each element of q and k in every layer (two transcendentals per element, ~6%
    of a d512 step). A matmul is never fused into its consumers, and one by the identity is exact
    (x·1 plus zeros), so it makes XLA keep the [B, L, 1, K/2] result in a buffer. Accelerators
    compute these fusions cheaply enough that the extra matmul is not worth it there."""
    if jax.default_backend() != "cpu":
        return x_BLNK
    return jnp.einsum("blnk,kj->blnj", x_BLNK, jnp.eye(x_BLNK.shape[-1], dtype=x_BLNK.dtype))


def layer_context(cfg: ModelConfig, segment_ids_BL, positions_BL, decode: bool) -> LayerContext:
    sin, cos = (_computed_once(t) for t in rotary_sin_cos(positions_BL, cfg.head_size, cfg.rope_theta))
    if decode:
        return LayerContext(sin, cos)
    B, L = segment_ids_BL.shape
    index_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    mask_BLS = attention_mask(segment_ids_BL, segment_ids_BL, index_BL, index_BL)
    bias, has_keys = attention_bias(mask_BLS)
    return LayerContext(sin, cos, bias, has_keys, causal_self_attention=True)


# ---------------------------------------------------------------------------------------------
# Layers


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


def rotary_sin_cos(positions_BL, head_dim: int, theta: float):
    """sin and cos [B, L, 1, K/2] of the RoPE angles, shared by every head and layer."""
    half = head_dim // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BLK = positions_BL[..., None].astype(jnp.float32) * inv_freq
    return jnp.sin(angles_BLK)[:, :, None, :], jnp.cos(angles_BLK)[:, :, None, :]


def apply_rotary(x_BLNK, sin, cos):
    """Rotates channel pairs (i, i + K/2) by position-dependent angles (RoPE, rotate-half form).
    Works for any head layout between L and K (e.g. [B, L, N, G, K]) given sin/cos broadcastable
    to it."""
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


def _attend(q_BLNGK, k_BSNK, v_BSNK, bias_B11LS, has_keys_B11L1):
    # Scores are laid out [B, N, L, G, S], the order in which the matmul produces them (batch
    # axes, then the query's free axes as they lie in q): as [B, N, G, L, S] XLA:CPU copied every
    # block's scores into a transposed buffer before the softmax (d512 step 2% slower).
    scale = 1.0 / math.sqrt(q_BLNGK.shape[-1])
    scores = jnp.einsum("blngk,bsnk->bnlgs", q_BLNGK * jnp.asarray(scale, q_BLNGK.dtype), k_BSNK)
    probs = _masked_softmax(scores, jnp.swapaxes(bias_B11LS, 2, 3), jnp.swapaxes(has_keys_B11L1, 2, 3))
    return jnp.einsum("bnlgs,bsnk->blngk", probs.astype(v_BSNK.dtype), v_BSNK)


def _attend_cache(q_BLNGK, k_XSK, v_XSK, bias_B11LS, has_keys_B11L1):
    """`_attend` over a KV cache whose rows are the (batch, KV head) pairs: X = B·N, b-major."""
    B, L, N, G, K = q_BLNGK.shape
    S = k_XSK.shape[1]
    scale = jnp.asarray(1.0 / math.sqrt(K), q_BLNGK.dtype)
    q_XMK = jnp.transpose(q_BLNGK * scale, (0, 2, 3, 1, 4)).reshape(B * N, G * L, K)  # M = G·L

    def attend(q_XmK, m):  # m = G'·L query rows per cache row
        scores_XmS = jnp.einsum("xmk,xsk->xms", q_XmK, k_XSK)
        probs = _masked_softmax(scores_XmS.reshape(B, N, m // L, L, S), bias_B11LS, has_keys_B11L1)
        return jnp.einsum("xms,xsk->xmk", probs.reshape(B * N, m, S).astype(v_XSK.dtype), v_XSK)

    if L == 1 and G > 1 and jax.default_backend() == "cpu":
        # XLA:CPU runs a batched [1, K]·[K, S] product on a fast matrix-vector path, and any
        # M > 1 through a GEMM that packs the cache first (M = 2 took 3× as long per step at 640
        # slots); one product per query head of the group reads the cache G times and is faster.
        out_XMK = jnp.concatenate([attend(q_XMK[:, g:g + 1], 1) for g in range(G)], axis=1)
    else:
        out_XMK = attend(q_XMK, G * L)
    return jnp.transpose(out_XMK.reshape(B, N, G, L, K), (0, 3, 1, 2, 4))


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


# Causal self-attention splits the queries into this many blocks, each attending only to keys up
# to its own end: 1/2 + 1/(2·blocks) of the full score matrix (62.5% at 4), with the same result,
# since the skipped keys are all in the future. More blocks means smaller, less efficient matmuls.
CAUSAL_QUERY_BLOCKS = 4
MIN_QUERY_BLOCK = 32


def dot_product_attention(q_BLNGK, k_BSNK, v_BSNK, bias_B11LS, has_keys_B11L1, causal_self=False,
                          blocks=CAUSAL_QUERY_BLOCKS):
    """Softmax attention with an additive bias; `causal_self` promises that key i is query i's
    position and that the bias hides every future key, which lets the queries be split into
    `blocks` blocks that each skip the keys after their own end."""
    L, S = q_BLNGK.shape[1], k_BSNK.shape[1]
    if not causal_self or L != S or L % blocks or L // blocks < MIN_QUERY_BLOCK:
        return _attend(q_BLNGK, k_BSNK, v_BSNK, bias_B11LS, has_keys_B11L1)
    size = L // blocks
    outs = []
    for i in range(blocks):
        lo, hi = i * size, (i + 1) * size
        outs.append(_attend(q_BLNGK[:, lo:hi], k_BSNK[:, :hi], v_BSNK[:, :hi],
                            bias_B11LS[..., lo:hi, :hi], has_keys_B11L1[..., lo:hi, :]))
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


class Attention(nn.Module):
    """Causal multi-head attention with grouped-query heads, RoPE and an optional KV cache.

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
        G = H // N
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        w_q = self.param("q", dense_init(cfg.init_std, ("embed", "heads", "head_dim")), (D, H, K))
        w_k = self.param("k", dense_init(cfg.init_std, ("embed", "kv_heads", "head_dim")), (D, N, K))
        w_v = self.param("v", dense_init(cfg.init_std, ("embed", "kv_heads", "head_dim")), (D, N, K))
        w_o = self.param("o", dense_init(out_std, ("heads", "head_dim", "embed")), (H, K, D))
        if context is None:
            context = layer_context(cfg, segment_ids_BL, positions_BL, self.decode)

        # One matmul for q, k and v: three narrow matmuls each re-read x and run well below the
        # matmul peak on CPU. The weights are concatenated per step (cheap next to the matmul),
        # so the parameters stay separate. Per KV head n the fused kernel holds its G query
        # heads, then k, then v, so tensor sharding over kv_heads keeps each group on one shard.
        w_qkv_DNJK = map_kernels(
            lambda q, k, v: jnp.concatenate(
                [q.reshape(q.shape[0], N, G, K), k[:, :, None], v[:, :, None]], axis=2
            ),
            w_q, w_k, w_v,
        )
        qkv_BLNJK = project_kernel(x_BLD, w_qkv_DNJK, 1, dtype, ("embed", "kv_heads", None, "head_dim"))
        qkv_BLNJK = constrain(qkv_BLNJK, (BATCH, LENGTH, ACT_KV_HEADS, None, None))
        # split, not three slices: its gradient is one concatenate, where the slices' gradients
        # are each padded to the full width and summed (two extra passes over [B, L, N, G+2, K]).
        q_BLNGK, k_BLN1K, v_BLN1K = jnp.split(qkv_BLNJK, [G, G + 1], axis=3)
        k_BLNK, v_BLNK = k_BLN1K[:, :, :, 0], v_BLN1K[:, :, :, 0]
        sin, cos = context.rope_sin, context.rope_cos
        q_BLNGK = apply_rotary(q_BLNGK, sin[..., None, :], cos[..., None, :])
        k_BLNK = apply_rotary(k_BLNK, sin, cos)

        if self.decode:
            out_BLNGK = self._attend_cached(q_BLNGK, k_BLNK, v_BLNK, segment_ids_BL)
        elif cfg.attention_impl == "cudnn" and context.causal_self_attention:
            out_BLNGK = fused_attention(q_BLNGK, k_BLNK, v_BLNK, context.attention_bias,
                                        context.query_has_keys)
        else:
            out_BLNGK = dot_product_attention(
                q_BLNGK, k_BLNK, v_BLNK, context.attention_bias, context.query_has_keys,
                causal_self=context.causal_self_attention,
            )
        B, L = segment_ids_BL.shape
        out_BLHK = constrain(out_BLNGK.reshape(B, L, H, K), (BATCH, LENGTH, ACT_HEADS, None))
        out_BLD = project_kernel(out_BLHK, w_o, 2, dtype)
        return constrain(out_BLD, (BATCH, LENGTH, ACT_EMBED))

    def _attend_cached(self, q_BLNGK, k_BLNK, v_BLNK, segment_ids_BL):
        """Writes this call's keys and values into the cache at `index` (and advances it), then
        attends over the whole cache.

        Keys and values are cached as [B·N, S, K], one row per (batch, KV head) pair, and the
        attention reads the updated arrays in exactly that shape. Then, with the cache donated
        (as `generate.Generator` does), XLA writes the new entries in place and the matmuls read
        the cache where it lies. A [B, S, N, K] cache was transposed for the matmuls, a copy of
        the whole cache in every layer at every step; so was [B, N, S, K] at batch 1, whose unit
        axis XLA drops (any reshape between the update and its reader makes XLA duplicate the
        update, each copy with its own whole-cache buffer)."""
        B, L, N, K = k_BLNK.shape
        is_init = not self.has_variable("cache", "key")
        # At init the input length is the cache capacity (the longest sequence to be generated).
        cached_k = self.variable("cache", "key", jnp.zeros, (B * N, L, K), k_BLNK.dtype)
        cached_v = self.variable("cache", "value", jnp.zeros, (B * N, L, K), v_BLNK.dtype)
        cached_seg = self.variable("cache", "segment_ids", jnp.zeros, (B, L), jnp.int32)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        q_index_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        if is_init:  # only the shapes matter
            mask_BLL = attention_mask(segment_ids_BL, segment_ids_BL, q_index_BL, q_index_BL)
            return _attend(q_BLNGK, k_BLNK, v_BLNK, *attention_bias(mask_BLL))
        start = index.value
        for cached, new_BLNK in ((cached_k, k_BLNK), (cached_v, v_BLNK)):
            new_XLK = jnp.swapaxes(new_BLNK, 1, 2).reshape(B * N, L, K)
            updated = jax.lax.dynamic_update_slice(cached.value, new_XLK, (0, start, 0))
            # Sharded like the keys and values themselves, so a sharded step never gathers it.
            cached.value = _constrain_cache(updated)
        cached_seg.value = jax.lax.dynamic_update_slice(
            cached_seg.value, segment_ids_BL.astype(jnp.int32), (0, start)
        )
        index.value = start + L
        S = cached_seg.value.shape[1]
        k_index_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        mask_BLS = attention_mask(segment_ids_BL, cached_seg.value, start + q_index_BL, k_index_BS)
        return _attend_cache(q_BLNGK, cached_k.value, cached_v.value, *attention_bias(mask_BLS))


ATTENTION_KINDS: dict[str, type[nn.Module]] = {"dot_product": Attention}


@jax.custom_vjp
def swiglu(gate_up_BLJF):
    """silu(gate) * up for gate and up stacked on axis -2 ([..., 2, F] -> [..., F]).

    Differentiated automatically, the forward pass keeps sigmoid(gate) and silu(gate) for the
    backward pass, which on CPU makes it three passes over [B, L, F] arrays instead of one. The
    hand-written VJP keeps only gate_up (the projection's output), recomputes the sigmoid in the
    backward pass and writes both gradients, stacked, in one pass."""
    return nn.silu(gate_up_BLJF[..., 0, :]) * gate_up_BLJF[..., 1, :]


def _swiglu_fwd(gate_up_BLJF):
    return swiglu(gate_up_BLJF), gate_up_BLJF


def _swiglu_bwd(gate_up_BLJF, dh_BLF):
    if jax.default_backend() == "cpu":
        # Without the barrier XLA merges this recomputation with the forward pass's, and keeps
        # sigmoid(gate) and silu(gate) in buffers again (the forward then takes three passes).
        gate_up_BLJF = jax.lax.optimization_barrier(gate_up_BLJF)
    gate, up = gate_up_BLJF[..., 0, :], gate_up_BLJF[..., 1, :]
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    d_gate = dh_BLF * up * (sig + silu * (1 - sig))
    d_up = dh_BLF * silu
    return (jnp.stack([d_gate, d_up], axis=-2),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


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
        # Gate and up as one [D, 2, F] matmul (see Attention for why); "mlp" stays the last axis,
        # so tensor sharding splits gate and up identically.
        w_gate_up_DJF = map_kernels(lambda g, u: jnp.stack([g, u], axis=1), w_gate, w_up)
        gate_up_BLJF = project_kernel(x_BLD, w_gate_up_DJF, 1, dtype, ("embed", None, "mlp"))
        gate_up_BLJF = constrain(gate_up_BLJF, (BATCH, LENGTH, None, ACT_MLP))
        h_BLF = constrain(swiglu(gate_up_BLJF), (BATCH, LENGTH, ACT_MLP))
        out_BLD = project_kernel(h_BLF, w_down, 1, dtype)
        return constrain(out_BLD, (BATCH, LENGTH, ACT_EMBED))
