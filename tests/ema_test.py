"""The params' EMA in the train state (jaxllm/training/ema.py): its closed form, its sharding, an
exact resume, and the restore path reading it."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from jaxllm import config as C
from jaxllm import restore, sharding, validation
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import train

from helpers import packed_batch, tiny_config

DECAY = 0.6


def _cfg(decay=DECAY, workdir="unused"):
    cfg = tiny_config(workdir=workdir)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, ema_decay=decay))


def _steps(step, s, state, first, n):
    history = []
    for t in range(first, first + n):
        state, _ = step(state, sharding.place_batch(packed_batch(seed=t), s.mesh))
        history.append(jax.device_get(state.params))
    return state, history


@pytest.fixture(scope="module")
def setup_and_step():
    """One setup and one compiled train step shared by the tests (the workdir only matters on disk)."""
    s = train.setup(dataclasses.replace(_cfg(), checkpoint=C.CheckpointConfig(async_save=False)))
    return s, train.make_train_step(s)


def test_ema_equals_its_closed_form_and_is_sharded_like_the_params(setup_and_step):
    s, step = setup_and_step
    state = train.init_state(s, jax.random.key(0))
    p0 = jax.device_get(state.params)
    state, history = _steps(step, s, state, 0, 3)
    # ema_3 = d^3 p_0 + (1 - d) (d^2 p_1 + d p_2 + p_3)
    d = DECAY
    want = jax.tree.map(lambda a, b, c, e: d ** 3 * a + (1 - d) * (d ** 2 * b + d * c + e), p0, *history)
    for got, w in zip(jax.tree.leaves(jax.device_get(state.ema)), jax.tree.leaves(want)):
        np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)
    assert jax.tree.map(lambda x: x.sharding, state.ema) == jax.tree.map(lambda x: x.sharding, state.params)
    assert not np.allclose(jax.tree.leaves(jax.device_get(state.ema))[0], jax.tree.leaves(history[-1])[0])


def test_ema_resumes_exactly_and_restore_reads_it(setup_and_step, tmp_path):
    s, step = setup_and_step
    workdir = str(tmp_path / "run")
    cfg = dataclasses.replace(s.cfg, workdir=workdir)
    straight, _ = _steps(step, s, train.init_state(s, jax.random.key(0)), 0, 4)

    half, _ = _steps(step, s, train.init_state(s, jax.random.key(0)), 0, 2)
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(C.to_json(cfg))
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir), cfg.checkpoint)
    checkpointer.save(2, half, {"data_step": 2, "config": C.to_dict(cfg)})
    resumed, start = train.restore_or_init(s, checkpointer)
    assert start == 2 and isinstance(resumed, train.EmaTrainState)
    resumed, _ = _steps(step, s, resumed, 2, 2)
    for a, b in zip(jax.tree.leaves(jax.device_get(straight)), jax.tree.leaves(jax.device_get(resumed))):
        np.testing.assert_array_equal(a, b)

    checkpointer.save(4, resumed, {"data_step": 4, "config": C.to_dict(cfg)})
    checkpointer.close()
    # The tools read the EMA of an EMA run, and the raw params when told the run has none.
    _, loaded = restore.load_params(workdir)
    for a, b in zip(jax.tree.leaves(jax.device_get(loaded)), jax.tree.leaves(jax.device_get(resumed.ema))):
        np.testing.assert_array_equal(a, b)
    raw, _, _ = restore.restore_params(ckpt.checkpoint_dir(workdir), _cfg(decay=0.0), s.mesh)
    for a, b in zip(jax.tree.leaves(jax.device_get(raw)), jax.tree.leaves(jax.device_get(resumed.params))):
        np.testing.assert_array_equal(a, b)


def test_a_run_without_ema_keeps_the_plain_state():
    s = train.setup(_cfg(decay=0.0))
    assert type(s.abstract_state) is train.TrainState


def test_ema_decay_must_be_in_range():
    with pytest.raises(C.ConfigError, match="ema_decay"):
        validation.validate(_cfg(decay=1.0))
