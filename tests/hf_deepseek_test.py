"""DeepSeek-V3 (`deepseek_v3`) in and out of Hugging Face (interop/hf.py, interop/hf_config.py)
against a fixture written by transformers 5.24 (tests/fixtures/make_hf_fixtures_deepseek.py): a
tiny random model with multi-head latent attention (q and kv low-rank, RoPE rows stored as
interleaved pairs), a dense first block, then MoE blocks of 8 routed experts (sigmoid, top 2,
2 groups of which 1 is kept, a correction bias, routed scale 2.5) and a shared expert; its
reference logits on an 80-token input and a 16-token greedy continuation; and a Qwen3-MoE whose
mlp_only_layers leave MoE blocks 2 and 4 of 5."""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm import restore, sharding
from jaxllm.decoding import Generator, SamplingConfig
from jaxllm.interop import hf
from jaxllm.layers.base import apply_rotary, rotary_sin_cos
from jaxllm.models import Transformer, transformer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "deepseek_v3")


def golden():
    return dict(np.load(os.path.join(FIXTURE, "golden.npz")))


def source_config() -> dict:
    return json.load(open(os.path.join(FIXTURE, "config.json")))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("deepseek") / "run")
    hf.import_checkpoint(FIXTURE, workdir)
    return workdir


def test_imported_logits_and_cached_greedy_decoding_equal_transformers(run):
    cfg, params = restore.load_params(run)
    m = cfg.model
    assert (m.attention_layer, m.moe.router, m.moe.first_dense, m.moe.num_groups, m.moe.routed_scale) == (
        "mla", "sigmoid", 1, 2, 2.5)
    assert "block_0" in params and "router_bias" in params["blocks"]["mlp"]  # dense prefix, scanned MoE blocks
    ref = golden()
    logits = jax.jit(Transformer(m).apply)({"params": params}, ref["input_ids"])
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
    (tokens,) = Generator(m).generate(params, [ref["prompt_ids"][0].tolist()],
                                      SamplingConfig(max_new_tokens=16, temperature=0.0, stop_at_eos=False), jax.random.key(0))
    assert tokens == ref["greedy"][0].tolist()


def test_unscanned_blocks_read_the_same_tensors_as_the_scanned_stack(run):
    """block_i of an unscanned import holds what layer i - 1 of the scan after the dense block_0 holds."""
    cfg, scanned = restore.load_params(run)
    mesh = sharding.make_mesh(C.MeshConfig(1, 1, 1, 1), jax.devices()[:1])
    unscanned = jax.device_get(hf.read_params(FIXTURE, C.override(cfg, ["model.scan_layers=false"]), mesh))
    scanned = jax.device_get(scanned)
    assert sorted(unscanned) == ["block_0", "block_1", "block_2", "embed", "final_norm", "unembed"]
    jax.tree.map(np.testing.assert_array_equal, unscanned["block_0"], scanned["block_0"])
    for i in (1, 2):
        jax.tree.map(lambda a, b, i=i: np.testing.assert_array_equal(a, b[i - 1]), unscanned[f"block_{i}"], scanned["blocks"])


def test_import_export_import_is_bit_identical(run, tmp_path):
    out = str(tmp_path / "exported")
    report = hf.export_checkpoint(run, out, max_shard_bytes=200_000)
    assert report["architecture"] == "DeepseekV3ForCausalLM" and report["shards"] >= 2
    original, exported = hf.SafetensorsFiles(FIXTURE), hf.SafetensorsFiles(out)
    assert set(exported.where) == set(original.where)
    # The RoPE rows go back to their interleaved places, the correction biases out with the router.
    for tensor in original.where:
        np.testing.assert_array_equal(exported.read(tensor), original.read(tensor), err_msg=tensor)
    written = json.load(open(os.path.join(out, "config.json")))
    source = source_config()
    for key in ("rope_interleave", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "n_group", "topk_group",
                "routed_scaling_factor", "first_k_dense_replace", "n_shared_experts", "moe_intermediate_size"):
        assert written[key] == source[key], key
    # Read back: the same params and the same model.
    cfg, params = restore.load_params(run)
    assert hf.model_config(written, base=cfg.model) == dataclasses.replace(cfg.model, tokenizer="bytes")
    again = hf.read_params(out, cfg, sharding.make_mesh(C.MeshConfig(1, 1, 1, 1), jax.devices()[:1]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(again))


def test_import_onto_an_8_device_mesh_equals_one_device():
    base = C.Config(mesh=C.MeshConfig(data=1, fsdp=2, tensor=2, expert=2))
    cfg = dataclasses.replace(base, model=hf.model_config(source_config(), base=base.model))
    many = hf.read_params(FIXTURE, cfg, sharding.make_mesh(cfg.mesh))
    one = hf.read_params(FIXTURE, cfg, sharding.make_mesh(C.MeshConfig(1, 1, 1, 1), jax.devices()[:1]))
    gate = many["blocks"]["mlp"]["gate"]  # [layers, E, D, F]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor")
    q_b = many["blocks"]["attn"]["q_b"]  # [layers, Q, H, A + R]: the permuted RoPE rows read per head shard
    assert len({str(s.index) for s in q_b.addressable_shards}) > 1
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(many), jax.device_get(one))


def test_rope_rows_turn_interleaved_rope_into_rotate_half():
    """transformers' DeepSeek RoPE rotates pairs (x0, x1), (x2, x3), ... and returns the rotated
    evens then odds; jaxllm's rotate-half RoPE on the rows `rope_rows` picks gives exactly that."""
    heads, nope, rope = 3, 4, 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, heads, nope + rope)).astype(np.float32)  # [L, H, A + R] in the file's order
    positions = np.arange(5)[None]
    sin, cos = (np.asarray(t)[0, :, None] for t in rotary_sin_cos(positions, rope, 10_000.0))  # [L, 1, R/2]
    evens, odds = x[..., nope::2], x[..., nope + 1::2]
    theirs = np.concatenate([evens * cos - odds * sin, odds * cos + evens * sin], axis=-1)
    ours = x.reshape(5, -1)[:, hf.rope_rows((heads, nope + rope), rope)].reshape(x.shape)
    np.testing.assert_array_equal(ours[..., :nope], x[..., :nope])
    np.testing.assert_allclose(np.asarray(apply_rotary(ours[None, ..., nope:], sin[None], cos[None]))[0], theirs,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}),
     r"config.json rope_scaling='linear' cannot be represented: of multi-head latent attention only YaRN"),
    (dict(rms_norm_eps=1e-5), r"config.json rms_norm_eps=1e-05 cannot be represented: the latent norms"),
    (dict(num_key_value_heads=2), r"num_key_value_heads=2 cannot be represented"),
    (dict(scoring_func="softmax"), r"scoring_func='softmax' cannot be represented"),
    (dict(topk_method="greedy"), r"topk_method='greedy' cannot be represented"),
    (dict(moe_layer_freq=2), r"moe_layer_freq=2 cannot be represented"),
    (dict(model_type="deepseek_v2"), r"model_type='deepseek_v2' disagrees with architectures"),
])
def test_what_cannot_be_imported_is_a_one_line_error(change, message):
    with pytest.raises(hf.HFError, match=message) as error:
        hf.model_config({**source_config(), **change})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("change, message", [
    (dict(moe=C.MoeConfig(num_experts=8, num_shared=1, router="softmax_topk", router_bias=True)), r"model.moe.router"),
    (dict(moe=C.MoeConfig(num_experts=8, num_shared=0, router="sigmoid", router_bias=True)), r"model.moe.num_shared"),
    (dict(qk_norm=True), r"model.qk_norm differ\(s\) from DeepseekV3ForCausalLM's recipe"),
])
def test_an_mla_model_without_a_deepseek_counterpart_is_refused_on_export(change, message):
    cfg = dataclasses.replace(hf.model_config(source_config()), **change)
    with pytest.raises(hf.HFError, match=message):
        hf.hf_architecture(cfg)


# Qwen3-MoE's dense blocks (mlp_only_layers, decoder_sparse_step): a fixture from the same script
# whose mlp_only_layers [0, 1, 3] leave MoE blocks 2 and 4 of 5.
QWEN3_MOE_DENSE = os.path.join(os.path.dirname(FIXTURE), "qwen3_moe_dense")


def test_qwen3_moe_mlp_only_layers_import_to_the_reference_logits_and_export_back():
    source = json.load(open(os.path.join(QWEN3_MOE_DENSE, "config.json")))
    cfg = dataclasses.replace(C.Config(), model=hf.model_config(source))
    assert (cfg.model.moe.first_dense, cfg.model.moe.every, cfg.model.scan_layers) == (1, 2, True)
    params = hf.read_params(QWEN3_MOE_DENSE, cfg, sharding.make_mesh(C.MeshConfig(1, 1, 1, 1), jax.devices()[:1]))
    assert "block_0" in params and "router" in params["blocks"]["block_1"]["mlp"]  # dense prefix, then (dense, MoE) x 2
    ref = dict(np.load(os.path.join(QWEN3_MOE_DENSE, "golden.npz")))
    logits = jax.jit(Transformer(cfg.model).apply)({"params": params}, ref["input_ids"])
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
    # Export: the same tensors under the same names, and the same dense blocks in config.json.
    original = hf.SafetensorsFiles(QWEN3_MOE_DENSE)
    exported = dict(hf._hf_tensors("Qwen3MoeForCausalLM", params, np.float32))
    assert set(exported) == set(original.where) - {"lm_head.weight"}  # tied
    for name, array in exported.items():
        np.testing.assert_array_equal(array, original.read(name), err_msg=name)
    written = hf.hf_config(cfg.model, {}, "float32")
    assert (written["decoder_sparse_step"], written["mlp_only_layers"]) == (1, [0, 1, 3])


@pytest.mark.parametrize("layers, step, dense, layout", [
    (2, 2, [], (0, 2)),  # every second block
    (4, 1, [0], (1, 1)),  # a dense first block
    (5, 1, [0, 1, 3], (1, 2)),  # the fixture's
    (6, 2, [1], (2, 2)),  # a dense prefix of whole periods keeps decoder_sparse_step
    (4, 1, [0, 1, 2, 3], None),  # no MoE block: a dense model
    (5, 2, [], "MoE blocks here: [1, 3]"),  # a dense last block
    (4, 1, [2], "MoE blocks here: [0, 1, 3]"),
])
def test_qwen3_moe_dense_blocks_map_to_first_dense_and_every(layers, step, dense, layout):
    """Which (model.moe.first_dense, model.moe.every) gives Qwen3-MoE's MoE blocks, and that
    export writes fields that read back as the same model."""
    source = {**json.load(open(os.path.join(QWEN3_MOE_DENSE, "config.json"))),
              "num_hidden_layers": layers, "decoder_sparse_step": step, "mlp_only_layers": dense}
    if isinstance(layout, str):
        with pytest.raises(hf.HFError, match=r"config.json mlp_only_layers=.* cannot be represented: .*" + re.escape(layout)):
            hf.model_config(source)
        return
    model = hf.model_config(source)
    if layout is None:
        assert model.moe.num_experts == 0 and hf.hf_architecture(model) == "Qwen3ForCausalLM"
        return
    assert (model.moe.first_dense, model.moe.every) == layout
    moe_blocks = [i for i in range(layers) if (i + 1) % step == 0 and i not in dense]
    assert [i for i in range(layers) if transformer.is_moe_layer(model, i)] == moe_blocks
    assert hf.model_config(hf.hf_config(model, {}, "float32")) == model


def test_the_hubs_deepseek_v3_config_layout_gives_the_same_model():
    """DeepSeek-V3 on the Hub (transformers 4 / its own code): rope_theta and rope_scaling at the
    top, scoring_func, topk_method, moe_layer_freq, ep_size, an MTP layer, no rope_interleave
    (interleaved is the default)."""
    new = source_config()
    hub = {k: v for k, v in new.items() if k not in ("rope_parameters", "rope_interleave", "dtype")}
    hub.update(rope_theta=10000.0, rope_scaling=None, torch_dtype="bfloat16", scoring_func="sigmoid",
               topk_method="noaux_tc", moe_layer_freq=1, ep_size=1, num_nextn_predict_layers=1)
    assert hf.model_config(hub) == hf.model_config(new)
    assert hf.interleaved_rope_dims(hub) == hf.interleaved_rope_dims(new) == 8
    assert hf.interleaved_rope_dims({**new, "rope_interleave": False}) == 0
