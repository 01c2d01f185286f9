"""Multi-head latent attention (layers/mla.py): cached decoding (absorbed up-projections over a
latent-only cache) equals full recompute; sharded training and decoding equal one device."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxllm import batching
from jaxllm import config as C
from jaxllm.compression import quantize
from jaxllm.decoding import Generator, SamplingConfig, left_pad
from jaxllm.layers import mla
from jaxllm.models.transformer import Transformer
from jaxllm.ops.projection import is_quantized
from jaxllm.training import train
from helpers import tiny_config, two_train_steps, with_model

MLA = C.MlaConfig(q_lora_rank=24, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
SHARDED = C.MeshConfig(data=2, fsdp=2, tensor=2, expert=1)


def mla_config(mesh=C.MeshConfig(data=1, fsdp=1, tensor=1, expert=1), **model) -> C.Config:
    cfg = with_model(tiny_config(), attention_layer="mla", **{"mla": MLA, **model})
    return dataclasses.replace(cfg, mesh=mesh)


def test_cached_decoding_equals_full_recompute_and_caches_only_the_latent():
    cfg = mla_config(scan_layers=False).model
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(0, 259, 5)), list(rng.integers(0, 259, 9))]
    continuation = rng.integers(0, 259, (2, 5)).astype(np.int32)
    params = Transformer(cfg).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    gen = Generator(cfg)
    tokens, segs, pos = left_pad(prompts)
    S = tokens.shape[1] + continuation.shape[1]
    cache = gen.init_cache(2, S)
    per_token = {name: leaf.shape for name, leaf in cache["block_0"]["attn"].items() if leaf.ndim == 3}
    assert per_token == {"latent": (2, S, MLA.kv_lora_rank), "rope_key": (2, S, MLA.qk_rope_head_dim)}
    assert mla.cache_bytes_per_token(cfg, 4) == 4 * (20 + 8)
    logits, cache = gen.forward(params, cache, tokens, segs, pos)
    cached = [logits[:, -1]]
    next_pos = pos[:, -1:] + 1
    for t in range(continuation.shape[1]):
        logits, cache = gen.forward(params, cache, continuation[:, t:t + 1], np.ones((2, 1), np.int32), next_pos)
        cached.append(logits[:, -1])
        next_pos = next_pos + 1
    full_model = Transformer(cfg)
    for i, prompt in enumerate(prompts):
        full = full_model.apply({"params": params}, np.array([prompt + list(continuation[i])], np.int32))[0]
        for t in range(continuation.shape[1] + 1):
            np.testing.assert_allclose(cached[t][i], full[len(prompt) - 1 + t], rtol=1e-4, atol=1e-4)


def test_mla_train_step_and_decoding_sharded_equal_single_device():
    _, single_state, single = two_train_steps(mla_config(), jax.devices()[:1])
    s, state, sharded = two_train_steps(mla_config(SHARDED))
    for got, want in zip(sharded, single):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    params = jax.device_get(single_state.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), jax.device_get(state.params), params)
    # Greedy decoding with the batch split over data x fsdp and the heads over tensor.
    greedy = SamplingConfig(max_new_tokens=4, temperature=0.0, stop_at_eos=False)
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12], [1], [40, 41]]
    want = Generator(s.cfg.model).generate(params, prompts, greedy, jax.random.key(0))
    assert Generator(s.cfg.model, s.mesh).generate(state.params, prompts, greedy, jax.random.key(0)) == want


def test_bad_mla_dimensions_are_a_clear_error():
    with pytest.raises(C.ConfigError, match="qk_rope_head_dim=7"):
        train.setup(mla_config(mla=dataclasses.replace(MLA, qk_rope_head_dim=7)))


def test_int8_mla_is_close_to_float_and_its_cached_decoding_equals_full_recompute():
    """Every MLA projection is quantized (compression/quantize.py); the logit error stays within
    quantize_test's bounds (RMS at most 2% of what the quantized kernels contribute, max 5% of
    the logits' spread), and decoding, which expands the cache through the int8 kv_b instead of
    absorbing it, equals the quantized model's full recompute."""
    cfg = mla_config(scan_layers=False, num_layers=1).model
    params = nn.meta.unbox(jax.jit(Transformer(cfg).init)(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    quantized = quantize.quantize_params(params)
    for name in ("q_a", "q_b", "kv_a", "kv_b", "o"):
        assert is_quantized(quantized["block_0"]["attn"][name]), name
    rng = np.random.default_rng(4)
    prompt, continuation = rng.integers(0, 259, (1, 9)).astype(np.int32), rng.integers(0, 259, (1, 4)).astype(np.int32)
    tokens = np.concatenate([prompt, continuation], axis=1)
    apply = jax.jit(lambda p: Transformer(cfg).apply({"params": p}, tokens))
    float_logits, int8_logits = np.asarray(apply(params)), np.asarray(apply(quantized))
    without_kernels = jax.tree_util.tree_map_with_path(
        lambda path, x: x if quantize.contracting_axes(quantize._path_str(path)) is None else 0 * x, params)
    contribution = float_logits - np.asarray(apply(without_kernels))
    error = int8_logits - float_logits
    assert 0 < np.sqrt(np.mean(error ** 2)) <= 0.02 * contribution.std()
    assert np.abs(error).max() <= 0.05 * float_logits.std()
    gen = Generator(cfg)
    cache = gen.init_cache(1, tokens.shape[1])
    positions = np.arange(tokens.shape[1], dtype=np.int32)[None]
    logits, cache = gen.forward(quantized, cache, prompt, np.ones_like(prompt), positions[:, :9])
    cached = [logits[:, -1]]
    for t in range(continuation.shape[1] - 1):
        logits, cache = gen.forward(quantized, cache, continuation[:, t:t + 1], np.ones((1, 1), np.int32),
                                    positions[:, 9 + t:10 + t])
        cached.append(logits[:, -1])
    np.testing.assert_allclose(np.concatenate(cached), int8_logits[0, 8:12], rtol=1e-4, atol=1e-4)


def test_continuous_batching_of_a_latent_attention_model_equals_each_prompt_alone():
    """The latent cache takes one write index per row, so refilled slots keep their own lengths."""
    cfg = dataclasses.replace(mla_config(scan_layers=False, num_layers=1).model, init_std=0.5)
    params = nn.meta.unbox(Transformer(cfg).init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"])
    rng = np.random.default_rng(5)
    prompts = [[1] + list(rng.integers(3, 259, n)) for n in (12, 1, 4, 7)]
    greedy = SamplingConfig(max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    alone = Generator(cfg)
    expected = [alone.generate(params, [p], greedy, jax.random.key(0))[0] for p in prompts]
    got = batching.ContinuousBatcher(cfg, slots=2, bucket=8).generate(params, prompts, greedy, jax.random.key(0))
    assert got == expected
    assert len({tuple(e) for e in expected}) == len(prompts)
