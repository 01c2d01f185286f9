"""Multi-head latent attention (layers/mla.py): cached decoding (absorbed up-projections over a
latent-only cache) equals full recompute; sharded training and decoding equal one device."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm.decoding import Generator, SamplingConfig, left_pad
from jaxllm.layers import mla
from jaxllm.models.transformer import Transformer
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
