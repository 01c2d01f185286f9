"""Ahead-of-time plans for TPU topologies (compile-only libtpu devices on this CPU host), the
multi-slice mesh, and the chunked loss that large vocabularies plan with."""

import dataclasses
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import tiny_config, two_train_steps, with_model
from jaxllm import config as C
from jaxllm.planning import hlo, plan, topology
from jaxllm.planning.topology import GIB


def _planned_config(**train):
    cfg = with_model(tiny_config(), d_model=256, num_heads=4, num_kv_heads=2, mlp_dim=512, dtype="bfloat16",
                     remat="full", vocab_size=512)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **(dict(batch_size=8, seq_len=128) | train)))


def test_topology_names():
    assert topology.parse("v5p-128").name == "v5p:4x4x4" and topology.parse("v5p-128").chips == 64
    assert topology.parse("v5p-512").name == "v5p:4x8x8"
    assert topology.parse("v5e-16").name == "v5e:4x4" and topology.parse("v5litepod-4").chips == 4
    assert topology.parse("v5p:4x4x8", num_slices=2).num_devices == 256
    with pytest.raises(C.ConfigError, match="unknown TPU topology"):
        topology.parse("h100-8")
    # The torus's wraparound rings, as Cloud TPU slices have them: whole 4x4x4 cubes on v4/v5p,
    # sides of 16 on v5e/v6e.
    assert topology.parse("v5p-128").wraparound == (True, True, True)
    assert topology.parse("v5p-64").wraparound == (False, False, False)
    assert topology.parse("v6e-128").wraparound == (False, True, False)
    assert topology.parse("v5e-256").wraparound == (True, True, False)


def test_plan_memory_matches_the_shapes():
    """Params and optimizer bytes per device are the shapes' bytes over the fsdp shards; the
    compiled arguments hold exactly them plus the batch; the step fits a v5e chip."""
    cfg = _planned_config()
    report = plan.plan(cfg, topology.parse("v5e:2x2"))
    n = report["model"]["params"]
    mem = report["memory_gib"]
    # float32 params split 4 ways (every sharded dimension divides); Adam's two moments twice that.
    assert mem["params"] * GIB == pytest.approx(n * 4 / 4, rel=0.02)
    assert mem["optimizer"] * GIB == pytest.approx(2 * n * 4 / 4, rel=0.05)
    # The compiled arguments are those arrays, padded to the TPU's (8, 128) tiles (small vectors
    # such as norm scales grow most).
    shapes = mem["params"] + mem["optimizer"] + mem["batch"]
    assert shapes <= mem["arguments"] <= 1.5 * shapes
    assert report["fits"] and report["mesh"]["fsdp"] == 4
    assert 0 < report["mfu"] < 1
    # fsdp gathers weights (or XLA's all-reduce form of it) and reduces gradients inside the layer loop.
    assert sum(c["in_loops"] for c in report["collectives"].values()) > 0
    # The per-layer cost correction: the step costs more than one layer's loop body counted once.
    # (The scanned program's own cost analysis, its loop body counted once, is reported beside it.)
    assert 0 < report["xla_body_once"]["flops"] < report["xla_flops_per_device"]
    assert 0 < report["xla_body_once"]["seconds"] < report["xla_step_s"]


def test_auto_attention_compiles_the_splash_kernel_for_tpu():
    """On a TPU mesh attention_impl=auto runs causal self-attention through the Pallas splash
    kernel (a Mosaic custom call in the program), which holds no [L, S] scores: less memory than
    the XLA path at the same shapes."""
    cfg = with_model(_planned_config(seq_len=2048), num_heads=2, num_kv_heads=1)
    topo = topology.parse("v5e:2x2")
    mesh = plan.sharding.make_mesh(cfg.mesh, topology.devices(topo))
    compiled = {impl: plan._compile_train_step(with_model(cfg, attention_impl=impl), mesh)[2]
                for impl in ("xla", "auto")}
    assert "tpu_custom_call" in compiled["auto"].as_text() and "tpu_custom_call" not in compiled["xla"].as_text()
    temps = {impl: c.memory_analysis().temp_size_in_bytes for impl, c in compiled.items()}
    assert temps["auto"] < 0.8 * temps["xla"]


def test_a_run_too_big_for_hbm_gets_a_verdict_not_a_crash():
    cfg = with_model(_planned_config(), d_model=4096, num_heads=32, num_kv_heads=8, mlp_dim=16384, num_layers=16)
    report = plan.plan(cfg, topology.parse("v5e:2x2"), costs=False)
    assert not report["fits"]
    text = plan.format_report(report)
    assert "DOES NOT FIT" in text


def test_generation_plan_holds_the_kv_cache_and_rejects_a_batch_that_does_not_divide():
    cfg = _planned_config()
    B, P, S = 8, 64, 128
    report = plan.plan(cfg, topology.parse("v5e:2x2"), costs=False,
                       generation={"batch": B, "prompt_len": P, "cache_len": S})
    gen, m = report["generation"], cfg.model
    # Keys and values of every layer, rows (batch, KV head) over 4 chips, in the compute dtype
    # (bfloat16); params in the decoding layout: the layers' kernels in bfloat16 as well, half the
    # float32 the training plan counted, the embeddings and norms as trained.
    cache = m.num_layers * 2 * B * m.num_kv_heads * S * (m.d_model // m.num_heads) * 2 / 4
    step_arguments = gen["decode_step"]["memory_gib"]["arguments"] * GIB
    params = report["memory_gib"]["params"] * GIB
    assert cache + params / 2 <= step_arguments < cache + params
    assert gen["fits"] and gen["decode_step"]["xla_s"] > 0 and gen["decode_tokens_per_s"] > 0
    with pytest.raises(C.ConfigError, match="multiple of 4"):
        plan.plan(cfg, topology.parse("v5e:2x2"), costs=False, generation={"batch": 6, "prompt_len": P, "cache_len": S})


def test_plan_cli_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "jaxllm.plan", "experiments/tiny_lm.py", "--topology", "a100-8"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "unknown TPU topology" in out.stderr


def test_collectives_are_counted_per_step():
    text = """HloModule m
%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag = f32[64]{0} all-gather(f32[8]{0} %x), dimensions={0}
}
ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %ar = f32[8]{0} all-reduce(f32[8]{0} %a), to_apply=%add
}
"""
    got = hlo.collectives(text)
    assert got["all-gather"] == {"count": 5, "bytes": 5 * 64 * 4, "in_loops": 1}
    assert got["all-reduce"]["count"] == 1


def test_multi_slice_mesh_trains_like_the_flat_mesh():
    """2 slices over DCN (dcn_data=2) x fsdp 4 inside each: same losses and params as data=2 x fsdp=4."""
    flat = dataclasses.replace(tiny_config(), mesh=C.MeshConfig(data=2, fsdp=4))
    sliced = dataclasses.replace(tiny_config(), mesh=C.MeshConfig(data=1, fsdp=-1, dcn_data=2))
    _, s_flat, h_flat = two_train_steps(flat)
    s, s_sliced, h_sliced = two_train_steps(sliced)
    assert dict(s.mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
    # Slice k holds devices 4k .. 4k+3: only the data axis crosses slices.
    ids = np.vectorize(lambda d: d.id)(s.mesh.devices)
    assert set(ids[0].flat) == {0, 1, 2, 3}
    for a, b in zip(h_flat, h_sliced):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s_flat.params), jax.tree.leaves(s_sliced.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_chunked_loss_equals_the_whole_loss():
    base = dataclasses.replace(tiny_config(), train=dataclasses.replace(tiny_config().train, z_loss=1e-3))
    for tied in (True, False):
        cfg = with_model(base, tie_embeddings=tied)
        chunked = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, loss_chunk=8))
        _, whole_state, whole = two_train_steps(cfg)
        _, chunk_state, parts = two_train_steps(chunked)
        for a, b in zip(whole, parts):
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
            np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-4)
        for a, b in zip(jax.tree.leaves(whole_state.params), jax.tree.leaves(chunk_state.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_loss_chunk_must_divide_the_sequence():
    cfg = dataclasses.replace(tiny_config(), train=dataclasses.replace(tiny_config().train, loss_chunk=7))
    with pytest.raises(C.ConfigError, match="loss_chunk"):
        plan.train.setup(cfg)


def test_a_moe_plan_reports_a_roofline_where_xla_estimates_a_negative_time():
    """libtpu's cost model gives the MoE layers' expert matmuls a negative time; the plan then
    quotes the roofline of XLA's flops and bytes, and says so. The scanned stack's cost is
    extrapolated from compiles of the dense first blocks plus one and two MoE groups; with two
    groups in all, the second of those compiles is the whole unscanned model."""
    cfg = dataclasses.replace(
        with_model(_planned_config(), num_layers=4,
                   moe=C.MoeConfig(num_experts=4, top_k=2, router="topk_softmax", first_dense=2)),
        mesh=C.MeshConfig(data=1, fsdp=-1, expert=2))
    report = plan.plan(cfg, topology.parse("v5e:2x2"))
    assert report["xla_flops_per_device"] == pytest.approx(report["xla_cost_parts"]["two_groups"]["flops"])
    assert report["xla_cost_parts"]["one_group"]["flops"] < report["xla_flops_per_device"]
    chip = topology.CHIPS["v5e"]
    assert report["roofline_step_s"] == pytest.approx(max(report["xla_flops_per_device"] / chip.peak_flops,
                                                          report["xla_bytes_per_device"] / chip.hbm_bandwidth))
    assert report["mfu_from"] == ("xla" if report["xla_step_s"] > 0 else "roofline") and 0 < report["mfu"] < 1
    assert report["collectives"]["all-to-all"]["count"] > 0
