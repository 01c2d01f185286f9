"""The fast paths in layers.py against their plain formulations: the custom-VJP projection, and
attention with an additive bias and skipped causal blocks (model_test's sequences are too short to
reach the block path)."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.layers import attention as attention_layers
from jaxllm.ops import attention as attention_ops
from jaxllm.ops import projection as projection_ops
from helpers import packed_batch


def _reference_attention(q_BLNGK, k_BSNK, v_BSNK, mask_BLS):
    """Masked softmax attention written the obvious way (select, softmax, zero empty rows)."""
    scores = jnp.einsum("blngk,bsnk->bngls", q_BLNGK / math.sqrt(q_BLNGK.shape[-1]), k_BSNK)
    mask = mask_BLS[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    probs = jnp.where(mask.any(-1, keepdims=True), probs, 0.0)
    return jnp.einsum("bngls,bsnk->blngk", probs, v_BSNK)


def _check_attention_against_reference(attend, shape_BLNGK, seed):
    """`attend(q, k, v, bias, has_keys)` on packed rows (two documents and padding each) matches
    the reference attention, values and gradients."""
    B, L, N, G, K = shape_BLNGK
    segment_ids = jnp.asarray(packed_batch(batch_size=B, seq_len=L, seed=seed)["segment_ids"])
    assert (segment_ids == 0).any()  # rows without visible keys are exercised
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in [(B, L, N, G, K), (B, L, N, K), (B, L, N, K)])
    index = jnp.broadcast_to(jnp.arange(L), (B, L))
    mask = attention_layers.attention_mask(segment_ids, segment_ids, index, index)
    bias, has_keys = attention_ops.attention_bias(mask)

    def fast(q, k, v):
        return attend(q, k, v, bias, has_keys)

    def reference(q, k, v):
        return _reference_attention(q, k, v, mask)

    np.testing.assert_allclose(fast(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)
    weights = jnp.asarray(rng.standard_normal((B, L, N, G, K)), jnp.float32)
    g_fast = jax.grad(lambda *a: jnp.sum(fast(*a) * weights), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(reference(*a) * weights), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_fast, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_blocked_causal_attention_equals_full_masked_softmax_with_gradients():
    shape = (2, 128, 2, 2, 16)
    assert shape[1] // attention_ops.CAUSAL_QUERY_BLOCKS >= attention_ops.MIN_QUERY_BLOCK  # the block path is taken
    _check_attention_against_reference(
        lambda q, k, v, bias, has_keys: attention_ops.dot_product_attention(q, k, v, bias, has_keys, causal_self=True),
        shape, seed=4)


def test_fused_attention_wrapper_equals_masked_softmax_with_gradients():
    """The cuDNN path's wrapper (boolean mask, GQA head layout, empty rows zeroed), run through
    jax's reference implementation since there is no GPU here; on a GPU benchmarks/attention.py
    compares the cuDNN kernel itself with the XLA path."""
    _check_attention_against_reference(
        lambda *args: attention_ops.fused_attention(*args, implementation="xla"), (2, 64, 2, 3, 16), seed=5)


def test_projection_matches_tensordot_and_its_gradients():
    rng = np.random.default_rng(1)
    for x_shape, w_shape, contract in [((2, 5, 8), (8, 3, 4), 1),  # wide output: transpose x
                                       ((2, 5, 3, 4), (3, 4, 6), 2),  # two contracted dims
                                       ((2, 5, 16), (16, 4), 1)]:  # narrow output: transpose g
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
        np.testing.assert_allclose(projection_ops.project(x, w, contract), jnp.tensordot(x, w, contract),
                                   rtol=1e-5, atol=1e-5)
        out_weights = jnp.asarray(rng.standard_normal(jnp.tensordot(x, w, contract).shape))
        g1 = jax.grad(lambda x, w: jnp.sum(projection_ops.project(x, w, contract) * out_weights), (0, 1))(x, w)
        g2 = jax.grad(lambda x, w: jnp.sum(jnp.tensordot(x, w, contract) * out_weights), (0, 1))(x, w)
        for a, b in zip(g1, g2):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
