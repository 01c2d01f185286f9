"""The int8 KV cache (model.kv_cache_dtype=int8) against the float cache."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import data, decoding, ops
from jaxllm.compression import quantize
from jaxllm.config import ConfigError, MlaConfig
from jaxllm.models import Transformer
from jaxllm.validation import validate
from helpers import tiny_config

STEPS = 6
MLA = MlaConfig(q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)


def model_config(kind):
    """A one-layer model attending with `kind`: an attention kind, or "mla" (latent attention)."""
    base = dataclasses.replace(tiny_config().model, init_std=0.2, num_layers=1)
    if kind.startswith("mla"):
        return dataclasses.replace(base, attention_layer="mla", mla=MLA)
    return dataclasses.replace(base, attention_kind=kind, window=4 if kind == "sliding_window" else 0)


def test_quantize_kv_error_is_at_most_half_a_step():
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16)) * jnp.arange(1, 4)[:, None]
    values, scale = ops.quantize_kv(x)
    assert values.dtype == jnp.int8 and scale.shape == (2, 5, 3, 1)
    assert (jnp.abs(values * scale - x) <= scale / 2 + 1e-6).all()


def cached_greedy(cfg, params, tokens, segs, pos, forced=None):
    """Prefill then STEPS greedy decode steps; (logits of every step [STEPS + 1, B, V], tokens).
    `forced` [STEPS + 1, B]: the tokens fed instead of the argmax (the logits then compare step
    by step)."""
    gen = decoding.Generator(cfg)
    B, P = tokens.shape
    prefix = jnp.asarray(segs != 0) if cfg.attention_kind == "prefix_lm" else None
    logits, cache = gen.prefill(params, gen.init_cache(B, P + STEPS), tokens, segs, pos, np.full(B, P - 1), prefix)
    all_logits, next_pos = [logits], pos[:, -1] + 1
    for t in range(STEPS):
        fed = jnp.argmax(all_logits[-1], -1).astype(jnp.int32) if forced is None else forced[t]
        logits, cache = gen.decode_step(params, cache, fed, next_pos + t)
        all_logits.append(logits)
    all_logits = np.stack(all_logits)
    return all_logits, all_logits.argmax(-1)


@pytest.mark.parametrize("kind", ["causal", "sliding_window", "prefix_lm", "mla", "mla_int8_weights"])
def test_int8_cache_decodes_like_the_float_cache(kind):
    """Every attention kind that decodes, and latent attention's cache: the logits of the prompt
    pass and of each cached decode step (fed the same tokens) stay close to the float cache's,
    and greedy decoding picks the same tokens except at near-ties. (Latent attention with int8
    weights expands the cache instead of absorbing the up-projections: the other path.)"""
    cfg = model_config(kind)
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    if kind == "mla_int8_weights":
        params = quantize.quantize_params(params)
    tokens, segs, pos = decoding.left_pad([[data.BOS_ID, 10, 11, 12, 13, 14, 15], [data.BOS_ID, 40, 41]])
    float_logits, float_tokens = cached_greedy(cfg, params, tokens, segs, pos)
    int8_cfg = dataclasses.replace(cfg, kv_cache_dtype="int8")
    int8_logits, int8_tokens = cached_greedy(int8_cfg, params, tokens, segs, pos, forced=float_tokens)
    spread = float_logits.std()
    error = np.abs(int8_logits - float_logits)
    # A random model with a large init amplifies the rounding through the layers.
    assert error.max() < 0.1 * spread and error.mean() < 0.01 * spread
    assert 0 < np.abs(int8_logits - float_logits).max()  # the cache really is quantized
    # Greedy picks agree wherever the float top-2 margin exceeds what the error can flip (a random
    # model has near-ties), and on most tokens.
    top2 = np.sort(float_logits, axis=-1)[..., -2:]
    margin = top2[..., 1] - top2[..., 0]
    assert ((int8_tokens == float_tokens) | (margin < 2 * error.max(axis=-1))).all()
    assert np.mean(int8_tokens == float_tokens) >= 0.85
    assert len(np.unique(float_tokens)) > 2  # not a model that repeats one token


def test_int8_cache_bytes_and_config_check():
    cfg = tiny_config().model
    K = cfg.head_size

    def cache_bytes(kv_dtype):
        gen = decoding.Generator(dataclasses.replace(cfg, kv_cache_dtype=kv_dtype))
        cache = jax.eval_shape(lambda: gen.init_cache(2, 64))
        return sum(leaf.size * leaf.dtype.itemsize for path, leaf in jax.tree_util.tree_leaves_with_path(cache)
                   if path[-1].key in ("key", "value", "key_scale", "value_scale"))

    # int8 values plus one float32 scale per slot and head, against two bytes per element.
    assert cache_bytes("int8") / cache_bytes("bfloat16") == pytest.approx((K + 4) / (2 * K))
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        validate(dataclasses.replace(tiny_config(), model=dataclasses.replace(cfg, kv_cache_dtype="int4")))


def test_int8_latent_cache_bytes():
    """Latent attention's int8 cache: int8 latent and RoPE key plus one float32 scale each per
    slot, against two bytes per element."""
    cfg = model_config("mla")

    def cache_bytes(kv_dtype):
        gen = decoding.Generator(dataclasses.replace(cfg, kv_cache_dtype=kv_dtype))
        cache = jax.eval_shape(lambda: gen.init_cache(2, 64))
        return sum(leaf.size * leaf.dtype.itemsize for path, leaf in jax.tree_util.tree_leaves_with_path(cache)
                   if path[-1].key in ("latent", "rope_key", "latent_scale", "rope_key_scale"))

    C, R = MLA.kv_lora_rank, MLA.qk_rope_head_dim
    assert cache_bytes("int8") / cache_bytes("bfloat16") == pytest.approx((C + R + 8) / (2 * (C + R)))
