import dataclasses

import jax
import numpy as np
import pytest

from jaxllm import checkpoint as ckpt
from jaxllm import config as C
from jaxllm import sharding, train
from helpers import packed_batch, tiny_config


def _trained_state(cfg):
    s = train.setup(cfg)
    state = train.init_state(s, jax.random.key(0))
    state, _ = train.make_train_step(s)(state, sharding.place_batch(packed_batch(), s.mesh))
    return s, state


def test_checkpoint_restores_onto_a_different_mesh(tmp_path):
    saved_cfg = dataclasses.replace(tiny_config(), mesh=C.MeshConfig(data=1, fsdp=8))
    _, state = _trained_state(saved_cfg)
    checkpointer = ckpt.Checkpointer(str(tmp_path / "ckpt"))
    checkpointer.save(1, state, {"data_step": 1})
    checkpointer.close()

    new_cfg = dataclasses.replace(tiny_config(), mesh=C.MeshConfig(data=2, fsdp=2, tensor=2))
    s_new = train.setup(new_cfg)
    restored, meta = ckpt.Checkpointer(str(tmp_path / "ckpt")).restore(s_new.abstract_state)
    assert meta["data_step"] == 1
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 jax.device_get(restored), jax.device_get(state))
    jax.tree.map(lambda arr, want: assert_sharding(arr, want), restored, s_new.state_shardings)

    # The restored state trains on the new mesh.
    next_state, metrics = train.make_train_step(s_new)(restored, sharding.place_batch(packed_batch(seed=1), s_new.mesh))
    assert np.isfinite(float(metrics["loss"]))


def assert_sharding(array, sharding_):
    assert array.sharding.is_equivalent_to(sharding_, array.ndim), (array.sharding, sharding_)


def test_partial_restore_of_params_only(tmp_path):
    cfg = tiny_config()
    s, state = _trained_state(cfg)
    checkpointer = ckpt.Checkpointer(str(tmp_path / "ckpt"))
    checkpointer.save(1, state, {"data_step": 1})
    checkpointer.close()
    restored, _ = ckpt.Checkpointer(str(tmp_path / "ckpt")).restore(
        {"params": s.abstract_state.params}, partial=True)
    assert set(restored) == {"params"}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["params"]), jax.device_get(state.params))


def test_keeps_only_the_last_k(tmp_path):
    cfg = tiny_config()
    _, state = _trained_state(cfg)
    checkpointer = ckpt.Checkpointer(str(tmp_path / "ckpt"), C.CheckpointConfig(keep=2))
    for step in (1, 2, 3):
        checkpointer.save(step, state, {"data_step": step})
    checkpointer.close()
    assert ckpt.Checkpointer(str(tmp_path / "ckpt")).all_steps() == [2, 3]


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.Checkpointer(str(tmp_path / "empty")).restore({})
