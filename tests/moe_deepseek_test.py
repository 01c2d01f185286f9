"""DeepSeek-V3-style MoE: the sigmoid router with its aux-loss-free bias, group-limited top-k, routed
scale, fine-grained + shared experts and the dense first blocks; expert parallel equals one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm import sharding, validation
from jaxllm.layers import moe
from helpers import tiny_config, two_train_steps, with_model
from moe_test import D, EXPERT_MESHES, SINGLE, assert_trees_close, layer_inputs, layer_params, run_layer

DEEPSEEK = dict(num_experts=16, top_k=4, router="sigmoid", router_bias=True, num_groups=4, topk_groups=2,
                routed_scale=2.5, num_shared=2, expert_dim=16, shared_dim=16, aux_loss_weight=0.0)


def sigmoid_moe(**overrides) -> C.MoeConfig:
    return C.MoeConfig(**{**DEEPSEEK, **overrides})


def test_sigmoid_router_picks_on_biased_affinity_and_weighs_by_the_unbiased_one():
    logits = jnp.asarray([[2.0, 1.0, 0.5, -1.0], [0.0, 0.1, 0.2, 0.3]])
    bias = jnp.asarray([0.0, 0.0, 0.0, 2.0])  # pushes expert 3 into every choice
    cfg = sigmoid_moe(num_experts=4, top_k=2, num_groups=1, topk_groups=1, routed_scale=2.5)
    r = moe.route(logits, cfg, bias)
    s = np.asarray(jax.nn.sigmoid(logits))
    np.testing.assert_array_equal(r.experts_TK, [[3, 0], [3, 2]])
    want = np.take_along_axis(s, np.asarray(r.experts_TK), -1)
    np.testing.assert_allclose(r.weights_TK, 2.5 * want / want.sum(-1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(r.probs_TE, s / s.sum(-1, keepdims=True), rtol=1e-6)
    raw = moe.route(logits, dataclasses.replace(cfg, renormalize=False, routed_scale=1.0), bias)
    np.testing.assert_allclose(raw.weights_TK, want, rtol=1e-6)  # the normalisation switch


def test_group_limited_routing_never_picks_outside_the_chosen_groups():
    E, G, J, K = 16, 4, 2, 4
    cfg = sigmoid_moe(num_experts=E, top_k=K, num_groups=G, topk_groups=J)
    logits = jax.random.normal(jax.random.key(0), (512, E)) * 3
    bias = jax.random.normal(jax.random.key(1), (E,)) * 0.3
    experts = np.asarray(moe.route(logits, cfg, bias).experts_TK)
    scores = np.asarray(jax.nn.sigmoid(logits) + bias).reshape(-1, G, E // G)
    group_score = np.sort(scores, -1)[..., -2:].sum(-1)  # the sum of each group's top two
    chosen_groups = np.argsort(-group_score, -1)[:, :J]
    assert all(set(row // (E // G)) <= set(groups) for row, groups in zip(experts, chosen_groups))
    # Within those groups the k best are taken, and the limit binds: plain top-k differs.
    plain = np.asarray(moe.route(logits, dataclasses.replace(cfg, num_groups=1, topk_groups=1), bias).experts_TK)
    assert (np.sort(plain, -1) != np.sort(experts, -1)).any(axis=-1).mean() > 0.2
    masked = np.where(np.isin(np.arange(E) // (E // G), chosen_groups[0]), scores.reshape(-1, E)[0], -np.inf)
    assert set(experts[0]) == set(np.argsort(-masked)[:K])


def deepseek_layer_config(**overrides) -> C.ModelConfig:
    return C.ModelConfig(d_model=D, num_layers=2, num_heads=4, mlp_dim=48, moe=sigmoid_moe(**overrides))


def test_deepseek_layer_expert_parallel_equals_single_device_and_the_bias_gets_no_gradient():
    cfg = deepseek_layer_config(dispatch="capacity", capacity_factor=1.0, aux_loss_weight=1e-2)
    _, params = layer_params(cfg)
    params["router_bias"] = jax.random.normal(jax.random.key(3), (16,)) * 0.5
    x = layer_inputs()
    valid = jnp.arange(x.shape[1])[None, :] < jnp.asarray([16, 16, 12, 16, 5, 16, 16, 9])[:, None]
    want = run_layer(cfg, params, x, sharding.make_mesh(SINGLE, jax.devices()[:1]), valid)
    assert want[0][2]["moe/dropped_fraction"][0] > 0.02, "the test should drop tokens"
    np.testing.assert_array_equal(want[1][0]["router_bias"], 0.0)
    assert np.abs(want[1][0]["router"]).max() > 1e-6
    got = run_layer(cfg, params, x, sharding.make_mesh(EXPERT_MESHES["data=2,expert=4"]), valid)
    assert_trees_close(got, want)


def test_bias_updates_move_the_load_toward_balance():
    cfg = deepseek_layer_config(num_groups=1, topk_groups=1)
    _, params = layer_params(cfg)
    skew = jnp.zeros(16).at[:4].set(0.5)  # a bias that has gone wrong: 4 experts take most copies
    params["router_bias"] = skew
    x = layer_inputs(batch=8, length=32)
    model = moe.MoeMlp(cfg)

    def load_and_update(params, _=None):
        _, variables = model.apply({"params": params}, x, mutable=["losses", "metrics"])
        load = moe.collect(variables)[1]["moe/expert_load"]
        return moe.update_router_biases(params, params, load, 0.02), load

    updated, first = jax.jit(load_and_update)(params)
    np.testing.assert_allclose(updated["router_bias"] - skew, 0.02 * np.sign(1 / 16 - np.asarray(first[0])), atol=1e-7)
    _, loads = jax.jit(lambda p: jax.lax.scan(load_and_update, p, length=60))(params)
    excess = np.asarray(loads).max(axis=(1, 2)) - 1 / 16  # the busiest expert's share above the mean
    assert excess[0] > 0.05 and excess[-1] < 0.5 * excess[0], excess


def deepseek_model_config(mesh: C.MeshConfig, **overrides):
    cfg = with_model(tiny_config(), num_layers=3,
                     moe=sigmoid_moe(**{"first_dense": 1, "bias_update_rate": 0.01, **overrides}))
    return dataclasses.replace(cfg, mesh=mesh)


def test_deepseek_train_step_equals_single_device_and_moves_only_the_biases_by_the_rule():
    _, single_state, single = two_train_steps(deepseek_model_config(SINGLE), jax.devices()[:1])
    _, state, sharded = two_train_steps(deepseek_model_config(EXPERT_MESHES["data=2,expert=4"]))
    for got, want in zip(sharded, single):
        for key in ("loss", "grad_norm", "moe/aux_loss", "moe/expert_fraction_max"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    params = jax.device_get(single_state.params)
    assert_trees_close(jax.device_get(state.params), params, rtol=1e-4, atol=1e-6)
    # Block 0 is dense and unscanned; the two MoE blocks are scanned, each with its own bias.
    assert "mlp" in params["block_0"] and "router" not in params["block_0"]["mlp"]
    bias = params["blocks"]["mlp"]["router_bias"]
    assert bias.shape == (2, 16)
    steps = np.round(np.asarray(bias) / 0.01)  # two steps of +-0.01 (or 0 for an expert at the mean)
    assert np.all(np.isin(steps, [-2, -1, 0, 1, 2])) and np.all(np.abs(np.asarray(bias) - 0.01 * steps) < 1e-7)
    assert np.any(steps != 0)


@pytest.mark.parametrize("bad, match", [
    (dict(num_groups=3), "num_groups=3 must divide"),
    (dict(topk_groups=5), "topk_groups=5"),
    (dict(top_k=9, topk_groups=2), "top_k=9 exceeds"),
    (dict(router_bias=False), "bias_update_rate"),
    (dict(first_dense=3), "first_dense=3"),
])
def test_bad_deepseek_routing_is_a_clear_error(bad, match):
    with pytest.raises(C.ConfigError, match=match):
        validation.validate(deepseek_model_config(SINGLE, **bad))
