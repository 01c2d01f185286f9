"""The central test of every parallel feature: one train step on a multi-device mesh gives the same
loss and gradient norm as on one device, and parameters are laid out the way the rules say."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import config as C
from jaxllm import sharding
from jaxllm.training import train
from helpers import packed_batch, tiny_config, two_train_steps

MESHES = {
    "data=8": C.MeshConfig(data=8, fsdp=1),
    "fsdp=8": C.MeshConfig(data=1, fsdp=8),
    "data=2,fsdp=4": C.MeshConfig(data=2, fsdp=4),
    "data=2,fsdp=2,tensor=2": C.MeshConfig(data=2, fsdp=2, tensor=2),
    "tensor=2,fsdp=4": C.MeshConfig(data=1, fsdp=4, tensor=2),
}


@pytest.fixture(scope="module")
def single_device_run():
    cfg = tiny_config()
    return two_train_steps(cfg, jax.devices()[:1])


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_step_equals_single_device(name, single_device_run):
    _, ref_state, ref_history = single_device_run
    cfg = dataclasses.replace(tiny_config(), mesh=MESHES[name])
    s, state, history = two_train_steps(cfg)
    for got, want in zip(history, ref_history):
        np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-5)
    # After two optimizer steps the parameters agree as well.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(state.params), jax.device_get(ref_state.params))


def test_parameters_are_sharded_by_the_rules():
    cfg = dataclasses.replace(tiny_config(), mesh=C.MeshConfig(data=2, fsdp=2, tensor=2))
    s = train.setup(cfg)
    state = train.init_state(s, jax.random.key(0))
    blocks = state.params["blocks"]
    expected = {
        ("mlp", "gate"): P(None, "fsdp", "tensor"),
        ("mlp", "down"): P(None, "tensor", "fsdp"),
        ("attn", "q"): P(None, "fsdp", "tensor", None),
        ("attn", "o"): P(None, "tensor", None, "fsdp"),
    }
    for (module, name), spec in expected.items():
        array = blocks[module][name]
        assert array.sharding.spec == spec, (module, name, array.sharding.spec)
        # Each device holds exactly 1/(fsdp*tensor) of the kernel.
        assert array.addressable_shards[0].data.size == array.size // 4
    assert state.params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert state.params["blocks"]["attn_norm"]["scale"].sharding.spec == P(None, None)
    # Optimizer moments are sharded like their parameters (ZeRO-3).
    adam = state.opt_state[1][0]
    assert adam.mu["blocks"]["mlp"]["gate"].sharding.spec == P(None, "fsdp", "tensor")


def test_batch_is_split_over_data_fsdp_and_expert():
    mesh = sharding.make_mesh(C.MeshConfig(data=2, fsdp=2, tensor=1, expert=2))
    batch = sharding.place_batch(packed_batch(), mesh)
    rows = jax.sharding.NamedSharding(mesh, P(("data", "fsdp", "expert"), None))
    assert batch["inputs"].sharding.is_equivalent_to(rows, 2)
    assert {shard.data.shape for shard in batch["inputs"].addressable_shards} == {(1, 32)}


def test_mesh_fills_the_minus_one_axis():
    assert sharding.mesh_shape(C.MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2, 1)


@pytest.mark.parametrize("mesh_cfg, message", [
    (C.MeshConfig(data=3, fsdp=-1), "does not divide 8"),
    (C.MeshConfig(data=2, fsdp=2, tensor=1), "uses 4 devices but 8 are available"),
    (C.MeshConfig(data=-1, fsdp=-1), "at most one mesh axis may be -1"),
])
def test_mesh_that_does_not_fit_is_a_clear_error(mesh_cfg, message):
    with pytest.raises(C.ConfigError, match=message):
        sharding.make_mesh(mesh_cfg)


def test_heads_not_divisible_by_tensor_is_a_clear_error():
    cfg = dataclasses.replace(tiny_config(), mesh=C.MeshConfig(data=1, fsdp=1, tensor=8))
    with pytest.raises(C.ConfigError, match=r"model.num_heads=4 is not divisible by the tensor mesh axis \(8\)"):
        train.setup(cfg)


def test_batch_not_divisible_by_data_axes_is_a_clear_error():
    cfg = dataclasses.replace(tiny_config(), mesh=C.MeshConfig(data=8, fsdp=1))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=12))
    with pytest.raises(C.ConfigError, match="batch_size"):
        train.setup(cfg)


def test_cudnn_attention_off_gpu_is_a_clear_error():
    cfg = C.override(tiny_config(), ["model.dtype=bfloat16", "model.attention_impl=cudnn"])
    with pytest.raises(C.ConfigError, match="attention_impl=cudnn needs NVIDIA GPUs, but the mesh's devices are cpu"):
        train.setup(cfg)


def test_expert_width_not_divisible_by_tensor_is_a_clear_error():
    cfg = tiny_config()
    moe = C.MoeConfig(num_experts=4, top_k=2, expert_dim=65)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=moe),
                              mesh=C.MeshConfig(data=1, fsdp=4, tensor=2))
    with pytest.raises(C.ConfigError, match=r"model.moe.expert_dim \(or mlp_dim\)=65 is not divisible by the tensor"):
        train.setup(cfg)
    shared = dataclasses.replace(moe, expert_dim=64, num_shared=1, shared_dim=33)
    with pytest.raises(C.ConfigError, match=r"num_shared \* shared_dim=33 is not divisible by the tensor"):
        train.setup(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, moe=shared)))


@pytest.mark.parametrize("devices, d_model, tensor, expected", [
    (8, 256, 1, (1, 8, 1)),
    (6, 256, 1, (3, 2, 1)),   # fsdp=6 would not divide d_model: the rest of the devices split data
    (8, 96, 2, (1, 4, 2)),
    (7, 256, 1, (7, 1, 1)),
])
def test_params_mesh_fits_any_device_count(devices, d_model, tensor, expected):
    model = dataclasses.replace(tiny_config().model, d_model=d_model)
    m = sharding.params_mesh_config(model, tensor, num_devices=devices)
    assert (m.data, m.fsdp, m.tensor) == expected and m.expert == 1
