"""The fast paths in jaxllm/ops against their plain formulations: the custom-VJP projection, and
attention with an additive bias and skipped causal blocks (model_test's sequences are too short to
reach the block path); and the attention kinds' masks (layers/attention.py)."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm.config import ConfigError
from jaxllm.decoding import Generator
from jaxllm.layers import ATTENTION_KINDS
from jaxllm.layers import attention as attention_layers
from jaxllm.models import Transformer
from jaxllm.ops import attention as attention_ops
from jaxllm.ops import projection as projection_ops
from jaxllm.ops import splash as splash_ops
from helpers import packed_batch, tiny_config


def _reference_attention(q_BLNGK, k_BSNK, v_BSNK, mask_BLS):
    """Masked softmax attention written the obvious way (select, softmax, zero empty rows)."""
    scores = jnp.einsum("blngk,bsnk->bngls", q_BLNGK / math.sqrt(q_BLNGK.shape[-1]), k_BSNK)
    mask = mask_BLS[:, None, None]
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    probs = jnp.where(mask.any(-1, keepdims=True), probs, 0.0)
    return jnp.einsum("bngls,bsnk->blngk", probs, v_BSNK)


def _check_attention_against_reference(attend, shape_BLNGK, seed, segments=False, padding_unspecified=False):
    """`attend(q, k, v, bias, has_keys)` (or `attend(q, k, v, segment_ids)` with `segments`) on
    packed rows (two documents and padding each) matches the reference attention, values and
    gradients; with `padding_unspecified`, at the real tokens (what reaches the loss) only."""
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
        return attend(q, k, v, segment_ids) if segments else attend(q, k, v, bias, has_keys)

    def reference(q, k, v):
        return _reference_attention(q, k, v, mask)

    real = (segment_ids != 0)[:, :, None, None, None] if padding_unspecified else True
    np.testing.assert_allclose(jnp.where(real, fast(q, k, v), 0), jnp.where(real, reference(q, k, v), 0),
                               rtol=1e-5, atol=1e-5)
    weights = jnp.where(real, jnp.asarray(rng.standard_normal((B, L, N, G, K)), jnp.float32), 0)
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


@pytest.mark.parametrize("fused_bwd_max_bytes", [splash_ops.FUSED_BWD_MAX_BYTES, 0], ids=["fused", "separate_dq"])
def test_splash_attention_equals_masked_softmax_with_gradients(monkeypatch, fused_bwd_max_bytes):
    """The TPU splash kernel's wrapper (segment ids for documents and padding, GQA heads, the
    fused backward and the separate dq kernel that long sequences get) through the Pallas
    interpreter, since there is no TPU here."""
    monkeypatch.setattr(splash_ops, "FUSED_BWD_MAX_BYTES", fused_bwd_max_bytes)
    splash_ops._kernel.cache_clear()
    _check_attention_against_reference(
        lambda q, k, v, segment_ids: splash_ops.splash_attention(q, k, v, segment_ids, interpret=True),
        (2, 256, 2, 2, 128), seed=6, segments=True, padding_unspecified=True)


def test_splash_attention_sharded_over_batch_and_heads_equals_one_device():
    shape = (4, 128, 2, 2, 128)
    rng = np.random.default_rng(7)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [shape, (4, 128, 2, 128), (4, 128, 2, 128)])
    segment_ids = jnp.asarray(packed_batch(batch_size=4, seq_len=128, seed=7)["segment_ids"])
    one = splash_ops.splash_attention(q, k, v, segment_ids, interpret=True)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh):
        sharded = jax.jit(lambda *a: splash_ops.splash_attention(*a, interpret=True))(q, k, v, segment_ids)
    np.testing.assert_allclose(sharded, one, rtol=1e-5, atol=1e-5)


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


def _mask(kind, segment_ids, prefix=None):
    segment_ids = jnp.asarray([segment_ids])
    index = jnp.arange(segment_ids.shape[1])[None]
    tokens = attention_layers.Tokens(segment_ids, index, None if prefix is None else jnp.asarray([prefix]))
    return np.asarray(ATTENTION_KINDS.get(kind).mask(tokens, tokens, C.ModelConfig()))[0]


def test_attention_kind_masks_truth_tables():
    segments = [1, 1, 1, 1, 2, 2, 0]
    same_doc = np.array([[a == b != 0 for b in segments] for a in segments])
    causal = np.tril(np.ones((7, 7), bool))
    np.testing.assert_array_equal(_mask("causal", segments), same_doc & causal)
    np.testing.assert_array_equal(_mask("bidirectional", segments), same_doc)
    # Prefix-LM: the first two tokens of document 1 and the first of document 2 are the prefix.
    # A prefix key is seen by every query of its document (the prefix attends bidirectionally);
    # other keys causally.
    prefix = [True, True, False, False, True, False, False]
    expected = same_doc & (causal | np.array(prefix)[None, :])
    np.testing.assert_array_equal(_mask("prefix_lm", segments, prefix), expected)
    assert _mask("prefix_lm", segments, prefix)[0, 1] and not _mask("prefix_lm", segments, prefix)[2, 3]


def test_prefix_outputs_do_not_depend_on_the_suffix():
    cfg = dataclasses.replace(tiny_config().model, attention_kind="prefix_lm")
    tokens = np.random.default_rng(0).integers(0, 259, (2, 12)).astype(np.int32)
    prefix = np.zeros((2, 12), bool)
    prefix[:, :5] = True
    model = Transformer(cfg)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    changed = tokens.copy()
    changed[:, 5:] = (changed[:, 5:] + 3) % 259
    base, other = (np.asarray(model.apply({"params": params}, t, prefix_BL=prefix)) for t in (tokens, changed))
    np.testing.assert_allclose(base[:, :5], other[:, :5], rtol=1e-6, atol=1e-6)
    # ... while the prefix itself is seen in both directions: its first position reads the last.
    moved = tokens.copy()
    moved[:, 4] = (moved[:, 4] + 3) % 259
    assert not np.allclose(base[:, 0], np.asarray(model.apply({"params": params}, moved, prefix_BL=prefix))[:, 0])


def test_a_bidirectional_model_refuses_to_generate():
    with pytest.raises(ConfigError, match="does not generate text"):
        Generator(dataclasses.replace(tiny_config().model, attention_kind="bidirectional"))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def test_norm_and_mlp_kinds_equal_their_formulas():
    """Each registered norm kind and MLP kind (with biases) against its formula in numpy: the
    recipes (Gemma's 1 + w, LayerNorm with bias, GeGLU, BERT's erf gelu, GPT-2's tanh gelu) that
    the Hugging Face parity tests do not all reach."""
    from jaxllm.layers.base import NORM_KINDS
    from jaxllm.layers.mlp import MLP_KINDS
    cfg = C.ModelConfig(d_model=8, mlp_dim=16, norm_eps=1e-5, mlp_bias=True, num_layers=1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8)).astype(np.float32)
    w, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    rms = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5)
    centred = x - x.mean(-1, keepdims=True)
    expected = {"rmsnorm": rms * w, "rmsnorm_plus_one": rms * (1 + w),
                "layernorm": centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + 1e-5) * w + b}
    for kind, want in expected.items():
        params = {"scale": w, **({"bias": b} if kind == "layernorm" else {})}
        got = jax.jit(NORM_KINDS.get(kind)(cfg).apply)({"params": params}, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=kind)
    p = {name: rng.standard_normal(shape).astype(np.float32) * 0.5 for name, shape in (
        ("gate", (8, 16)), ("up", (8, 16)), ("down", (16, 8)), ("gate_bias", (16,)), ("up_bias", (16,)),
        ("down_bias", (8,)))}
    erf = np.vectorize(math.erf)
    acts = {"geglu": None, "swiglu": None, "gelu": lambda h: 0.5 * h * (1 + erf(h / math.sqrt(2))), "gelu_tanh": _gelu_tanh}
    for kind, act in acts.items():
        up = x @ p["up"] + p["up_bias"]
        if act is None:  # gated
            gate = x @ p["gate"] + p["gate_bias"]
            h = (_gelu_tanh(gate) if kind == "geglu" else gate / (1 + np.exp(-gate))) * up
            params = p
        else:
            h = act(up)
            params = {k: v for k, v in p.items() if not k.startswith("gate")}
        got = jax.jit(MLP_KINDS.get(kind)(cfg).apply)({"params": params}, x)
        np.testing.assert_allclose(got, h @ p["down"] + p["down_bias"], rtol=1e-4, atol=1e-4, err_msg=kind)
