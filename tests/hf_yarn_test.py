"""YaRN RoPE scaling (model.rope_scaling.kind=yarn, layers/base.py) against transformers 5.24
(tests/fixtures/make_hf_fixtures_deepseek_yarn.py): a tiny DeepSeek-V3 with rope_parameters yarn
(factor 4 over an original context of 32, so the 80-token input runs past it; mscale 1 and
mscale_all_dim 0.5, so both the attention factor on cos/sin and DeepSeek's mscale^2 on the score
scale are exercised), and transformers' inverse frequencies and attention factors for the
DeepSeek-V3 / Kimi K2 and a Qwen3-style rope_parameters, truncate false and an explicit
attention_factor."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm import sharding, validation
from jaxllm.decoding import Generator, SamplingConfig
from jaxllm.interop import hf
from jaxllm.layers.base import ROPE_SCALINGS, rotary_sin_cos
from jaxllm.models import Transformer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "deepseek_v3_yarn")


def source_config() -> dict:
    return json.load(open(os.path.join(FIXTURE, "config.json")))


@pytest.fixture(scope="module")
def imported():
    """(Config, params) read straight from the fixture (the run-directory path is hf_deepseek_test's)."""
    cfg = dataclasses.replace(C.Config(), model=hf.model_config(source_config()))
    return cfg, hf.read_params(FIXTURE, cfg, sharding.make_mesh(C.MeshConfig(1, 1, 1, 1), jax.devices()[:1]))


def test_yarn_deepseek_logits_and_cached_greedy_decoding_equal_transformers(imported):
    cfg, params = imported
    m = cfg.model
    r = m.rope_scaling
    assert (r.kind, r.factor, r.original_max_len, r.beta_fast, r.beta_slow, r.mscale, r.mscale_all_dim) == (
        "yarn", 4.0, 32, 32.0, 1.0, 1.0, 0.5)
    assert m.query_scale == pytest.approx((16 + 16) ** -0.5 * (0.05 * math.log(4) + 1) ** 2, rel=1e-12)
    ref = dict(np.load(os.path.join(FIXTURE, "golden.npz")))
    logits = jax.jit(Transformer(m).apply)({"params": params}, ref["input_ids"])
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
    (tokens,) = Generator(m).generate(params, [ref["prompt_ids"][0].tolist()],
                                      SamplingConfig(max_new_tokens=16, temperature=0.0, stop_at_eos=False), jax.random.key(0))
    assert tokens == ref["greedy"][0].tolist()


def test_yarn_deepseek_exports_the_same_tensors_and_a_config_that_reads_back_the_same(imported):
    """Import -> export -> import is the identity: export writes the fixture's tensors bit for bit
    (RoPE rows interleaved again) and a config.json that imports to the same model."""
    cfg, params = imported
    original = hf.SafetensorsFiles(FIXTURE)
    exported = dict(hf._hf_tensors(hf.DEEPSEEK, params, np.float32, cfg.model.mla.qk_rope_head_dim))
    assert set(exported) == set(original.where)
    for name, array in exported.items():
        np.testing.assert_array_equal(array, original.read(name), err_msg=name)
    source = source_config()
    written = hf.hf_config(cfg.model, {}, "float32", source=source)
    for key in ("rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim", "rope_theta"):
        assert written["rope_parameters"][key] == source["rope_parameters"][key], key
    assert written["rope_scaling"]["type"] == "yarn" and written["max_position_embeddings"] == source["max_position_embeddings"]
    assert hf.model_config(written) == cfg.model


REFERENCE = json.load(open(os.path.join(FIXTURE, "rope_reference.json")))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_yarn_frequencies_and_attention_factor_equal_transformers(name):
    """A Llama config.json with each rope_parameters imports to the inverse frequencies and the
    cos/sin factor transformers computes, and exports back to the same model."""
    case = REFERENCE[name]
    head_dim = case["head_dim"]
    source = {"architectures": ["LlamaForCausalLM"], "vocab_size": 320, "hidden_size": 4 * head_dim,
              "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": head_dim, "intermediate_size": 64,
              "max_position_embeddings": case["max_position_embeddings"], "rope_parameters": case["rope_parameters"]}
    model = hf.model_config(source)
    theta, scaling = model.rope_theta, model.rope_scaling
    half = head_dim // 2
    inv_freq, factor = ROPE_SCALINGS.get("yarn")(theta ** (-jnp.arange(half, dtype=jnp.float32) / half), scaling, theta)
    np.testing.assert_allclose(np.asarray(inv_freq), np.float32(case["inv_freq"]), rtol=1e-6, atol=0)
    assert factor == pytest.approx(case["attention_factor"], rel=1e-12)
    positions = np.array([[0, 1, 7, 100, 5000]])
    sin, cos = (np.asarray(t)[0, :, 0] for t in rotary_sin_cos(positions, head_dim, theta, scaling))
    angles = positions[0, :, None] * np.float32(case["inv_freq"])
    np.testing.assert_allclose(cos, np.cos(angles) * case["attention_factor"], atol=2e-4)
    np.testing.assert_allclose(sin, np.sin(angles) * case["attention_factor"], atol=2e-4)
    assert hf.model_config(hf.hf_config(model, {}, "float32")) == model


def test_the_hubs_deepseek_v3_yarn_config_imports_and_exports():
    """DeepSeek-V3 / Kimi K2 on the Hub: rope_scaling {type: yarn, factor 40, mscale 1,
    mscale_all_dim 1, original_max_position_embeddings 4096} at the top level."""
    hub = {k: v for k, v in source_config().items() if k not in ("rope_parameters", "dtype")}
    hub.update(rope_theta=10000.0, max_position_embeddings=163840, rope_scaling={
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn"})
    model = hf.model_config(hub)
    assert model.rope_scaling == C.RopeScalingConfig(kind="yarn", factor=40.0, original_max_len=4096, beta_fast=32.0,
                                                     beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    mscale = 0.1 * math.log(40) + 1
    assert model.query_scale == (16 + 16) ** -0.5 * mscale * mscale  # in transformers' order
    written = hf.hf_config(model, {}, "bfloat16", source=hub)
    assert written["rope_scaling"] == {**hub["rope_scaling"], "rope_type": "yarn"}
    assert hf.model_config(written) == model
    # A query scale that is not YaRN's has no DeepSeek counterpart.
    with pytest.raises(hf.HFError, match=r"model.query_scale differ\(s\) from its recipe"):
        hf.hf_architecture(dataclasses.replace(model, query_scale=0.1))
    with pytest.raises(hf.HFError, match=r"rope_scaling='llama3' cannot be represented: .* only YaRN"):
        hf.model_config({**hub, "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})


def test_yarn_with_beta_slow_above_beta_fast_is_refused():
    cfg = C.override(C.Config(), ["model.rope_scaling.kind=yarn"])
    validation.validate(cfg)  # the defaults: factor 8, beta_slow 1, beta_fast 32
    with pytest.raises(C.ConfigError, match=r"model.rope_scaling \(yarn\) needs .* 0 < beta_slow < beta_fast; got 8.0, 8192, 32.0, 1.0"):
        validation.validate(C.override(cfg, ["model.rope_scaling.beta_slow=32", "model.rope_scaling.beta_fast=1"]))
