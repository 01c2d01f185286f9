"""Sliding-window attention (layers/sliding_window.py): the mask, the fast attention path against a
reference that masks the full score matrix, and cached decoding that never looks past the window."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.decoding import Generator, left_pad
from jaxllm.layers import ATTENTION_KINDS
from jaxllm.layers.attention import Tokens
from jaxllm.models import Transformer
from jaxllm.ops import attention as attention_ops
from helpers import packed_batch, tiny_config, with_model
from layers_test import _reference_attention as reference_attention

WINDOW = 4


def window_model(window=WINDOW, **overrides):
    return with_model(tiny_config(), attention_kind="sliding_window", window=window, **overrides).model


def mask_of(segment_ids, cfg):
    B, L = segment_ids.shape
    index = jnp.broadcast_to(jnp.arange(L), (B, L))
    tokens = Tokens(jnp.asarray(segment_ids), index)
    return np.asarray(ATTENTION_KINDS.get("sliding_window").mask(tokens, tokens, cfg))


def test_mask_truth_table():
    segment_ids = np.array([[1, 1, 1, 1, 1, 1, 2, 2, 2, 0]])
    mask = mask_of(segment_ids, window_model(window=3))[0]
    for q in range(10):
        for k in range(10):
            expected = (segment_ids[0, q] == segment_ids[0, k] != 0) and 0 <= q - k < 3
            assert mask[q, k] == expected, (q, k)


def test_blocked_attention_equals_reference_masking_the_full_scores():
    B, L, N, G, K = 2, 128, 2, 2, 16
    assert L // attention_ops.CAUSAL_QUERY_BLOCKS >= attention_ops.MIN_QUERY_BLOCK  # block path taken
    cfg = window_model(window=40)
    mask = jnp.asarray(mask_of(packed_batch(batch_size=B, seq_len=L, seed=2)["segment_ids"], cfg))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(B, L, N, G, K), (B, L, N, K), (B, L, N, K)])

    def fast(q, k, v):
        return attention_ops.attend(q, k, v, *attention_ops.attention_bias(mask), causal_self=True)

    def reference(q, k, v):
        return reference_attention(q, k, v, mask)

    np.testing.assert_allclose(fast(q, k, v), reference(q, k, v), rtol=1e-5, atol=1e-5)
    probe = jnp.asarray(rng.standard_normal((B, L, N, G, K)), jnp.float32)
    g_fast = jax.grad(lambda *a: jnp.sum(fast(*a) * probe), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(lambda *a: jnp.sum(reference(*a) * probe), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_fast, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_tokens_beyond_the_window_do_not_change_the_logits():
    cfg = window_model(num_layers=1)  # one layer: the receptive field is exactly the window
    tokens = packed_batch(batch_size=2, seq_len=16)["inputs"]
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    changed = tokens.copy()
    changed[:, 0] = (changed[:, 0] + 1) % 259
    base, other = (np.asarray(model.apply({"params": params}, t)) for t in (tokens, changed))
    assert not np.allclose(base[:, :WINDOW], other[:, :WINDOW])
    np.testing.assert_array_equal(base[:, WINDOW:], other[:, WINDOW:])


def test_cached_decoding_equals_full_recompute_past_the_window():
    """Greedy generation with the KV cache equals recomputing the whole sequence for every token,
    over prompts and continuations several windows long (left padding included)."""
    cfg = window_model()
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(1), np.zeros((1, 8), np.int32))["params"])
    rng = np.random.default_rng(4)
    prompts = [list(rng.integers(0, 259, 3)), list(rng.integers(0, 259, 11))]
    tokens, segs, pos = left_pad(prompts)
    gen = Generator(cfg)
    steps = 3 * WINDOW
    cache = gen.init_cache(2, tokens.shape[1] + steps)
    logits, cache = gen.forward(params, cache, tokens, segs, pos)
    cached, next_pos = [logits[:, -1]], pos[:, -1:] + 1
    continuation = rng.integers(0, 259, (2, steps)).astype(np.int32)
    for t in range(steps):
        logits, cache = gen.forward(params, cache, continuation[:, t:t + 1], np.ones((2, 1), np.int32), next_pos)
        cached.append(logits[:, -1])
        next_pos = next_pos + 1
    for i, prompt in enumerate(prompts):
        full = model.apply({"params": params}, np.array([prompt + list(continuation[i])], np.int32))[0]
        for t in range(steps + 1):
            np.testing.assert_allclose(cached[t][i], full[len(prompt) - 1 + t], rtol=1e-4, atol=1e-4)
