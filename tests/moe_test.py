"""Mixture-of-experts: routing, losses, dispatch strategies, and expert parallelism on 8 devices
(expert-parallel equals single device, all-to-all in the compiled step, 1/n of every expert tensor
per device, checkpoints across expert meshes)."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.training import checkpoint as ckpt
from jaxllm import config as C
from jaxllm import sharding
from jaxllm.layers import moe
from jaxllm.ops import GROUPED_FFNS
from jaxllm.training import train
from helpers import packed_batch, tiny_config, two_train_steps, with_model

E, K, D, F = 8, 2, 32, 48
SINGLE = C.MeshConfig(data=1, fsdp=1, tensor=1, expert=1)


def layer_config(**moe_overrides) -> C.ModelConfig:
    return C.ModelConfig(d_model=D, num_layers=2, num_heads=4, mlp_dim=F,
                         moe=C.MoeConfig(num_experts=E, top_k=K, **moe_overrides))


def layer_params(cfg: C.ModelConfig, seed=0):
    x = jnp.zeros((2, 4, D))
    boxed = moe.MoeMlp(cfg).init(jax.random.key(seed), x)["params"]
    params = nn.meta.unbox(boxed)
    # A router scaled up from the init's 0.02 std gives decisive, uneven routing (some experts
    # overflow their capacity), which is what the comparisons should exercise.
    params["router"] = params["router"] * 50.0
    return boxed, params


def layer_inputs(batch=8, length=16, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, length, D), jnp.float32)


def run_layer(cfg, params, x, mesh, valid=None):
    """Output, summed sown loss, metrics and the gradients of a scalar function of the output with
    respect to the params and the input, on `mesh` with the params in their rule shardings.
    `valid` [B, L] marks the tokens that are not padding (default: all)."""
    model = moe.MoeMlp(cfg)
    shardings = sharding.state_shardings(layer_params(cfg)[0], mesh)
    placed = jax.device_put(params, shardings)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
    x = jax.device_put(x, rows)
    valid = jax.device_put(jnp.ones(x.shape[:2], bool) if valid is None else valid, rows)
    probe = jax.random.normal(jax.random.key(7), x.shape)

    def loss(params, x):
        out, variables = model.apply({"params": params}, x, valid, mutable=["losses", "metrics"])
        router_loss, metrics = moe.collect(variables)
        return jnp.sum(out * probe) + router_loss, (out, router_loss, metrics)

    with sharding.activate(mesh):
        (_, aux), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(placed, x)
    return jax.device_get((aux, grads))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


EXPERT_MESHES = {
    "expert=8": C.MeshConfig(data=1, fsdp=1, tensor=1, expert=8),
    "data=2,expert=4": C.MeshConfig(data=2, fsdp=1, tensor=1, expert=4),
    "fsdp=2,expert=4": C.MeshConfig(data=1, fsdp=2, tensor=1, expert=4),
}


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_expert_parallel_layer_equals_single_device(dispatch):
    # capacity_factor 1.0 with the sharpened router drops tokens, so the capacity case also checks
    # that the dropping does not depend on the mesh. Some rows end in padding.
    cfg = layer_config(dispatch=dispatch, capacity_factor=1.0)
    _, params = layer_params(cfg)
    x = layer_inputs()
    valid = jnp.arange(x.shape[1])[None, :] < jnp.asarray([16, 16, 12, 16, 5, 16, 16, 9])[:, None]
    want = run_layer(cfg, params, x, sharding.make_mesh(SINGLE, jax.devices()[:1]), valid)
    if dispatch == "capacity":
        assert want[0][2]["moe/dropped_fraction"][0] > 0.02, "the test should drop tokens"
    for name, mesh_cfg in EXPERT_MESHES.items():
        got = run_layer(cfg, params, x, sharding.make_mesh(mesh_cfg), valid)
        try:
            assert_trees_close(got, want)
        except AssertionError as e:
            raise AssertionError(f"mesh {name}: {e}") from None


def test_blocked_and_ragged_dot_and_dense_grouped_matmuls_agree():
    rng = np.random.default_rng(0)
    R = 200
    x = jnp.asarray(rng.normal(size=(R, D)), jnp.float32)
    group = jnp.asarray(rng.integers(0, E + 1, R), jnp.int32)  # E marks rows to ignore
    ws = [jnp.asarray(rng.normal(size=s) * 0.2, jnp.float32) for s in ((E, D, F), (E, D, F), (E, F, D))]
    outs = {kind: fn(x, group, *ws) for kind, fn in GROUPED_FFNS.items()}
    ignored = np.asarray(group) == E
    for kind, out in outs.items():
        np.testing.assert_array_equal(np.asarray(out)[ignored], 0.0, err_msg=kind)
        np.testing.assert_allclose(np.asarray(out), np.asarray(outs["dense"]), rtol=2e-5, atol=2e-5,
                                   err_msg=kind)


def test_capacity_with_room_for_every_token_equals_dropless():
    x = layer_inputs()
    cfg_drop = layer_config(dispatch="dropless")
    _, params = layer_params(cfg_drop)
    mesh = sharding.make_mesh(SINGLE, jax.devices()[:1])
    want = run_layer(cfg_drop, params, x, mesh)
    # Factor E/K: capacity = tokens per row, so no expert can overflow.
    got = run_layer(layer_config(dispatch="capacity", capacity_factor=E / K), params, x, mesh)
    assert got[0][2]["moe/dropped_fraction"][0] == 0.0
    assert_trees_close(got, want)


def test_capacity_drops_exactly_the_copies_a_hand_built_routing_drops():
    cfg = layer_config(dispatch="capacity", capacity_factor=1.0)
    _, params = layer_params(cfg)
    x = layer_inputs(batch=4, length=16)
    model = moe.MoeMlp(cfg)
    out, variables = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["losses", "metrics"]))(params, x)

    # By hand: per row, first choices claim slots in token order, then second choices; an
    # expert takes at most C = ceil(K * L / E * factor) copies per row.
    logits = np.asarray(x, np.float64) @ np.asarray(params["router"], np.float64)
    choices = np.argsort(-logits, axis=-1)[..., :K]  # [B, L, K]
    B, L = x.shape[:2]
    C_ = math.ceil(K * L / E * 1.0)
    kept = np.zeros((B, L, K), bool)
    for b in range(B):
        used = np.zeros(E, int)
        for k in range(K):
            for t in range(L):
                e = choices[b, t, k]
                if used[e] < C_:
                    used[e] += 1
                    kept[b, t, k] = True
    dropped = (~kept).sum()
    assert dropped > 0
    got = float(variables["metrics"]["dropped_fraction"][0])
    assert got == pytest.approx(dropped / (B * L * K))

    # A token with both copies dropped passes nothing on (the residual carries it in the block).
    both = ~kept.any(-1)
    assert both.any(), "the routing should drop some token entirely"
    np.testing.assert_array_equal(np.asarray(out)[both], 0.0)
    assert np.all(np.abs(np.asarray(out)[kept.all(-1)]).sum(-1) > 0)


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_padding_takes_no_capacity_and_changes_nothing_for_the_real_tokens(dispatch):
    """A row's real tokens get the same output, losses and metrics alone, left- or right-padded,
    and next to another row: padding neither claims expert slots nor counts in the router sums
    (before, identical padding vectors all chose the same experts and filled them)."""
    cfg = layer_config(dispatch=dispatch, capacity_factor=1.0)
    _, params = layer_params(cfg)
    model = moe.MoeMlp(cfg)
    apply = jax.jit(lambda x, valid: model.apply({"params": params}, x, valid, mutable=["metrics"]))
    real = layer_inputs(batch=1, length=8, seed=3)
    pad = jnp.broadcast_to(layer_inputs(batch=1, length=1, seed=4), (1, 8, D))
    alone, alone_vars = apply(real, jnp.ones((1, 8), bool))
    if dispatch == "capacity":
        assert float(alone_vars["metrics"]["dropped_fraction"][0]) > 0, "the test should drop tokens"
    real_first = jnp.arange(16)[None] < 8
    for x, valid, where in ((jnp.concatenate([pad, real], 1), ~real_first, slice(8, 16)),
                            (jnp.concatenate([real, pad], 1), real_first, slice(0, 8))):
        out, variables = apply(x, valid)
        np.testing.assert_allclose(out[:, where], alone, rtol=1e-6, atol=1e-6)
        assert_trees_close(variables["metrics"], alone_vars["metrics"])
    other = layer_inputs(batch=1, length=16, seed=5)
    out, _ = apply(jnp.concatenate([jnp.concatenate([pad, real], 1), other]),
                   jnp.concatenate([~real_first, jnp.ones((1, 16), bool)]))
    np.testing.assert_allclose(out[:1, 8:], alone, rtol=1e-6, atol=1e-6)


def test_aux_loss_is_one_under_uniform_routing_and_counts_imbalance():
    T = 64
    uniform = {"counts_E": jnp.full((E,), T * K / E), "prob_sum_E": jnp.full((E,), T / E),
               "z_sum": jnp.zeros(()), "entropy_sum": jnp.zeros(()), "tokens": jnp.asarray(float(T))}
    aux, _, metrics = moe.losses_and_metrics(uniform, jnp.zeros(()), E, K)
    assert float(aux) == pytest.approx(1.0)
    assert float(metrics["expert_fraction_max"]) == pytest.approx(1 / E)
    # Every copy to expert 0, which also holds all the probability: aux = E.
    collapsed = dict(uniform, counts_E=jnp.zeros(E).at[0].set(T * K), prob_sum_E=jnp.zeros(E).at[0].set(T))
    aux, _, _ = moe.losses_and_metrics(collapsed, jnp.zeros(()), E, K)
    assert float(aux) == pytest.approx(E)

    # A zero router gives uniform probabilities: aux is exactly 1 whatever top-k picks.
    cfg = layer_config()
    _, params = layer_params(cfg)
    params["router"] = jnp.zeros_like(params["router"])
    _, variables = moe.MoeMlp(cfg).apply({"params": params}, layer_inputs(), mutable=["metrics"])
    assert float(variables["metrics"]["aux_loss"][0]) == pytest.approx(1.0, abs=1e-6)
    assert float(variables["metrics"]["router_entropy"][0]) == pytest.approx(math.log(E), abs=1e-5)


@pytest.mark.parametrize("router", ["softmax_topk", "topk_softmax"])
def test_gradients_flow_to_the_router_through_the_outputs_and_the_losses(router):
    cfg = layer_config(router=router)
    _, params = layer_params(cfg)
    x = layer_inputs()
    model = moe.MoeMlp(cfg)

    def output_only(p):
        return jnp.sum(model.apply({"params": p}, x, mutable=["losses"])[0] ** 2)

    def losses_only(p):
        return moe.collect(model.apply({"params": p}, x, mutable=["losses", "metrics"])[1])[0]

    for fn in (output_only, losses_only):
        g = jax.grad(fn)(params)["router"]
        assert np.all(np.isfinite(g)) and np.abs(np.asarray(g)).max() > 1e-6, fn.__name__


def test_routing_weights_follow_the_configured_rule():
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0]])
    mixtral = dataclasses.replace(layer_config().moe, num_experts=4, router="topk_softmax")
    experts, weights, _ = moe.route(logits, mixtral)
    np.testing.assert_array_equal(experts, [[0, 1]])
    np.testing.assert_allclose(weights, jax.nn.softmax(jnp.asarray([[2.0, 1.0]])), rtol=1e-6)
    switch = dataclasses.replace(mixtral, router="softmax_topk", renormalize=False)
    _, weights, probs = moe.route(logits, switch)
    np.testing.assert_allclose(weights, probs[:, :2], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The whole model


def moe_model_config(mesh: C.MeshConfig, **moe_overrides):
    cfg = with_model(tiny_config(), moe=C.MoeConfig(num_experts=E, top_k=K, **moe_overrides))
    return dataclasses.replace(cfg, mesh=mesh)


# Every other block is MoE, with a shared expert and capacity dispatch: the layer pattern scan, the
# shared expert and token dropping all go through the comparisons.
MODEL_MOE = dict(every=2, num_shared=1, dispatch="capacity", capacity_factor=1.0)


@pytest.fixture(scope="module")
def single_device_moe_steps():
    return two_train_steps(moe_model_config(SINGLE, **MODEL_MOE), jax.devices()[:1])


@pytest.mark.parametrize("mesh_cfg", [
    EXPERT_MESHES["data=2,expert=4"],
    C.MeshConfig(data=1, fsdp=2, tensor=2, expert=2),  # with fsdp and tensor sharding around it
], ids=["data=2,expert=4", "fsdp=2,tensor=2,expert=2"])
def test_moe_train_step_equals_single_device(mesh_cfg, single_device_moe_steps):
    _, single_state, single = single_device_moe_steps
    _, state, sharded = two_train_steps(moe_model_config(mesh_cfg, **MODEL_MOE))
    for got, want in zip(sharded, single):
        for key in ("loss", "grad_norm", "moe/loss", "moe/dropped_fraction", "moe/aux_loss"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    assert single[0]["moe/dropped_fraction"][0] > 0
    assert_trees_close(jax.device_get(state.params), jax.device_get(single_state.params), rtol=1e-4, atol=1e-6)


def test_router_jitter_perturbs_only_when_given_randomness_and_is_reproducible():
    cfg = layer_config(jitter=0.3)
    _, params = layer_params(cfg)
    x = layer_inputs()
    model = moe.MoeMlp(cfg)

    def out(seed=None):
        rngs = None if seed is None else {"dropout": jax.random.key(seed)}
        return np.asarray(model.apply({"params": params}, x, rngs=rngs, mutable=["losses"])[0])

    plain = out()
    np.testing.assert_array_equal(out(0), out(0))
    assert not np.allclose(out(0), plain, atol=1e-4)
    assert not np.allclose(out(0), out(1), atol=1e-4)
    # Without jitter, randomness changes nothing.
    no_jitter = moe.MoeMlp(layer_config())
    np.testing.assert_array_equal(
        no_jitter.apply({"params": params}, x, rngs={"dropout": jax.random.key(0)}, mutable=["losses"])[0],
        no_jitter.apply({"params": params}, x, mutable=["losses"])[0])


def expert_leaves(params):
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if any(str(getattr(k, "key", "")) in ("gate", "up", "down") for k in path)
            and leaf.ndim == 4}  # [layers, E, ., .]: the experts, not the shared expert


def test_expert_parallel_step_exchanges_tokens_and_never_gathers_experts():
    cfg = moe_model_config(EXPERT_MESHES["data=2,expert=4"])
    s = train.setup(cfg)
    state = train.init_state(s, jax.random.key(0))
    experts = expert_leaves(state.params)
    # gate, up, down, each stacked over the two MoE layers by the scan
    assert sorted(experts) == ["blocks/mlp/down", "blocks/mlp/gate", "blocks/mlp/up"]
    for path, leaf in experts.items():
        for shard in leaf.addressable_shards:
            assert shard.data.shape[1] == E // 4, (path, shard.data.shape)
            assert shard.data.size * 4 == leaf.size, path

    step = train.make_train_step(s)
    batch = sharding.place_batch(packed_batch(), s.mesh)
    with sharding.activate(s.mesh):
        hlo = step.jitted.lower(state, batch).compile().as_text()
    # An all-gather whose result ends in a whole [E, D, F] expert tensor (whatever leading layer
    # dimensions) would mean the experts were collected onto one device.
    whole_experts = {leaf.shape[-3:] for leaf in experts.values()}
    gathers = [line for line in hlo.splitlines() if " all-gather(" in line]
    for line in gathers:
        result = line.split("=", 1)[1].strip().split(" ", 1)[0]  # e.g. f32[1,8,64,128]{3,2,0,1}
        dims = tuple(int(d) for d in result[result.index("[") + 1:result.index("]")].split(",") if d)
        assert dims[-3:] not in whole_experts, line
    assert "all-to-all" in hlo


def test_moe_checkpoint_saved_on_expert8_restores_on_data4_expert2(tmp_path):
    saved_cfg = moe_model_config(EXPERT_MESHES["expert=8"])
    s = train.setup(saved_cfg)
    state = train.init_state(s, jax.random.key(0))
    state, _ = train.make_train_step(s)(state, sharding.place_batch(packed_batch(), s.mesh))
    checkpointer = ckpt.Checkpointer(str(tmp_path / "ckpt"))
    checkpointer.save(1, state, {"data_step": 1})
    checkpointer.close()

    new = train.setup(moe_model_config(C.MeshConfig(data=4, fsdp=1, tensor=1, expert=2)))
    restored, _ = ckpt.Checkpointer(str(tmp_path / "ckpt")).restore(new.abstract_state)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 jax.device_get(restored), jax.device_get(state))
    for leaf in expert_leaves(restored.params).values():
        assert {shard.data.shape[1] for shard in leaf.addressable_shards} == {E // 2}


def test_experts_not_divisible_by_the_expert_axis_is_a_clear_error():
    cfg = dataclasses.replace(moe_model_config(C.MeshConfig(data=1, fsdp=1, tensor=1, expert=8)),
                              model=dataclasses.replace(tiny_config().model, moe=C.MoeConfig(num_experts=6)))
    with pytest.raises(C.ConfigError, match="num_experts=6 is not divisible by the expert mesh axis"):
        train.setup(cfg)
