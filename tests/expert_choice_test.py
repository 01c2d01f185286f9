"""Expert-choice routing (layers/expert_choice.py): the selection on a hand-built example, exactly
C tokens per expert, the layer against a reference written with loops, and expert-parallel equals
single device."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import sharding
from jaxllm.layers import moe
from jaxllm.layers.expert_choice import choose_tokens
from jaxllm.ops.grouped_ffn import swiglu_ECD
from moe_test import E, EXPERT_MESHES, SINGLE, assert_trees_close, layer_config, layer_inputs, layer_params, run_layer


def test_each_expert_takes_its_top_c_tokens_on_a_hand_built_example():
    # One row of 5 tokens, 3 experts, C = 2; token 4 is padding (never chosen, whatever its score).
    probs = np.array([[[0.6, 0.3, 0.1],
                       [0.1, 0.7, 0.2],
                       [0.5, 0.1, 0.4],
                       [0.2, 0.2, 0.6],
                       [0.9, 0.9, 0.9]]], np.float32)
    valid = np.array([[True, True, True, True, False]])
    gate, token, taken = jax.device_get(choose_tokens(jnp.asarray(probs), jnp.asarray(valid), 2))
    assert token[0].tolist() == [[0, 2], [1, 0], [3, 2]]
    np.testing.assert_allclose(gate[0], [[0.6, 0.5], [0.7, 0.3], [0.6, 0.4]])
    assert taken.all()
    # Token 1 is taken by one expert, tokens 0 and 2 by two, token 3 by one, the padding by none.


def test_every_expert_gets_exactly_c_distinct_tokens():
    rng = np.random.default_rng(0)
    b, L, E_, C = 4, 32, 8, 5
    probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((b, L, E_)), jnp.float32), axis=-1)
    valid = np.ones((b, L), bool)
    valid[1, 20:] = False  # padding shrinks the choice, never the count
    _, token, taken = jax.device_get(choose_tokens(probs, jnp.asarray(valid), C))
    assert taken.all() and token.shape == (b, E_, C)
    for row in range(b):
        for e in range(E_):
            assert len(set(token[row, e].tolist())) == C
            assert valid[row, token[row, e]].all()
    # A row with fewer valid tokens than C leaves the remaining slots empty.
    short = np.zeros((1, L), bool)
    short[0, :3] = True
    _, _, taken = jax.device_get(choose_tokens(probs[:1], jnp.asarray(short), C))
    assert (taken.sum(-1) == 3).all()


def test_layer_equals_a_loop_over_experts_and_their_chosen_tokens():
    cfg = layer_config(dispatch="expert_choice", capacity_factor=1.0)
    _, params = layer_params(cfg)
    x = layer_inputs(batch=2, length=16)
    out, _, dropped = jax.jit(lambda x: moe.moe_tokens(
        x, jnp.ones(x.shape[:2], bool), params["router"], params["gate"], params["up"], params["down"], cfg.moe))(x)
    x64, router = np.asarray(x, np.float64), np.asarray(params["router"], np.float64)
    logits = x64 @ router
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    B, L = x.shape[:2]
    C = int(np.ceil(cfg.moe.top_k * L / E * cfg.moe.capacity_factor))
    want = np.zeros(x.shape)
    chosen = np.zeros((B, L), bool)
    for row in range(B):
        for e in range(E):
            for t in np.argsort(-probs[row, :, e], kind="stable")[:C]:
                y = swiglu_ECD(x[row, t][None, None], params["gate"][e:e + 1], params["up"][e:e + 1],
                               params["down"][e:e + 1])
                want[row, t] += probs[row, t, e] * np.asarray(y[0, 0], np.float64)
                chosen[row, t] = True
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)
    assert float(dropped) == (~chosen).sum()


def test_expert_parallel_equals_single_device():
    cfg = layer_config(dispatch="expert_choice")
    _, params = layer_params(cfg)
    x = layer_inputs()
    valid = jnp.arange(x.shape[1])[None, :] < jnp.asarray([16, 16, 12, 16, 5, 16, 16, 9])[:, None]
    want = run_layer(cfg, params, x, sharding.make_mesh(SINGLE, jax.devices()[:1]), valid)
    for name, mesh_cfg in EXPERT_MESHES.items():
        got = run_layer(cfg, params, x, sharding.make_mesh(mesh_cfg), valid)
        try:
            assert_trees_close(got, want, rtol=1e-4, atol=1e-5)
        except AssertionError as e:
            raise AssertionError(f"mesh {name}: {e}") from None
