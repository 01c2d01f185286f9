import dataclasses
import os
import shutil

import jax
import numpy as np
import pytest

from jaxllm.training import checkpoint as ckpt
from jaxllm import config as C
from jaxllm import sharding
from jaxllm.training import train
from helpers import packed_batch, tiny_config

# When one array of a restore cannot be read, orbax (0.12) leaves the other reads' coroutines
# suspended; closed later by the garbage collector, in whichever test runs then, each turns the
# GeneratorExit into an Exception ("Encountered error while reading array index"), which pytest
# reports as an unraisable-exception warning. Only that noise is ignored.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <coroutine object _read_array_index_and_device_put"
    ":pytest.PytestUnraisableExceptionWarning"
)


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


# A checkpoint whose files cannot be read (a disk filled up, a copy cut short) is reported as such,
# with the step to resume from; a config that does not fit the checkpoint is still a mismatch.


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A tiny run trained for 4 steps, checkpointed at steps 2 and 4 (each test copies it)."""
    root = tmp_path_factory.mktemp("two_checkpoints")
    cfg = _run_config(root / "run", str(root / "tfds"))
    train.train(cfg)
    assert ckpt.Checkpointer(ckpt.checkpoint_dir(cfg.workdir)).all_steps() == [2, 4]
    return cfg


def _run_config(workdir, data_dir):
    cfg = tiny_config(workdir=str(workdir))
    return dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, data_dir=data_dir, eval_split=""),
        train=dataclasses.replace(cfg.train, steps=4),
        checkpoint=C.CheckpointConfig(every=2, keep=3, async_save=False),
    )


def _copy_run(cfg, tmp_path):
    shutil.copytree(cfg.workdir, tmp_path / "run")
    return dataclasses.replace(cfg, workdir=str(tmp_path / "run"))


def _truncate(path, fraction=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * fraction))


def _truncate_array_data(step_dir, fraction):
    """Truncates the files of the saved state's OCDBT database (its arrays, under d/ folders). Cut
    in half, some arrays' bytes are gone, and a full restore fails; which ones depends on the order
    the writer threads ran in, so a partial restore of the params only fails for sure at 0."""
    for d, _, names in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(d) == "d":
            for name in names:
                _truncate(os.path.join(d, name), fraction)


def _files(directory):
    return {os.path.join(d, name): os.path.getsize(os.path.join(d, name))
            for d, _, names in os.walk(directory) for name in names}


def test_a_corrupted_checkpoint_names_the_step_to_resume_from_and_resuming_from_it_works(
        two_checkpoints, tmp_path):
    cfg = _copy_run(two_checkpoints, tmp_path)
    directory = ckpt.checkpoint_dir(cfg.workdir)
    _truncate_array_data(os.path.join(directory, "4"), 0.5)
    before = _files(directory)

    with pytest.raises(ckpt.CheckpointReadError) as error:
        train.train(cfg)
    message = str(error.value)
    assert isinstance(error.value, C.ConfigError)  # every command prints these as one line
    assert "\n" not in message
    assert f"checkpoint step 4 in {directory} cannot be read" in message
    assert "truncated or corrupted" in message and "does not match" not in message
    assert "previous checkpoint is step 2" in message
    assert f"move {os.path.join(directory, '4')} out of {directory}" in message
    assert "resume from step 2" in message
    assert _files(directory) == before  # the error path touches nothing

    # Doing what the message says resumes from step 2.
    shutil.move(os.path.join(directory, "4"), os.path.join(cfg.workdir, "corrupted-step-4"))
    seen = []
    train.train(cfg, log=seen.append)
    assert [r["step"] for r in seen] == [3, 4]
    assert ckpt.Checkpointer(directory).all_steps() == [2, 4]


def test_a_different_model_is_still_a_config_mismatch_not_a_read_error(two_checkpoints, tmp_path):
    cfg = _copy_run(two_checkpoints, tmp_path)
    before = _files(ckpt.checkpoint_dir(cfg.workdir))
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=128))
    with pytest.raises(C.ConfigError, match="does not match this config's model") as error:
        train.train(wider)
    assert not isinstance(error.value, ckpt.CheckpointReadError)
    assert _files(ckpt.checkpoint_dir(cfg.workdir)) == before


@pytest.mark.parametrize("damage", ["array data", "tree metadata", "meta"])
def test_every_unreadable_part_is_a_read_error_for_full_and_partial_restores(two_checkpoints, tmp_path, damage):
    cfg = _copy_run(two_checkpoints, tmp_path)
    directory = ckpt.checkpoint_dir(cfg.workdir)
    step_dir = os.path.join(directory, "4")
    if damage == "array data":
        _truncate_array_data(step_dir, 0)
    elif damage == "tree metadata":
        _truncate(os.path.join(step_dir, "state", "_METADATA"))
    else:
        _truncate(os.path.join(step_dir, "meta", "metadata"))
    s = train.setup(cfg)
    checkpointer = ckpt.Checkpointer(directory, read_only=True)
    try:
        for target, partial in ((s.abstract_state, False), ({"params": s.abstract_state.params}, True)):
            with pytest.raises(ckpt.CheckpointReadError, match="checkpoint step 4 .* previous checkpoint is step 2"):
                with sharding.activate(s.mesh):
                    checkpointer.restore(target, partial=partial)
        if damage == "meta":
            with pytest.raises(ckpt.CheckpointReadError, match="checkpoint step 4 .* previous checkpoint is step 2"):
                checkpointer.restore_meta()
        else:
            assert checkpointer.restore_meta()["data_step"] == 4
        # The step before is intact.
        _, meta = checkpointer.restore(s.abstract_state, step=2)
        assert meta["data_step"] == 2
    finally:
        checkpointer.close()


def test_a_corrupted_only_checkpoint_says_to_start_a_new_workdir(two_checkpoints, tmp_path):
    cfg = _copy_run(two_checkpoints, tmp_path)
    directory = ckpt.checkpoint_dir(cfg.workdir)
    shutil.rmtree(os.path.join(directory, "2"))
    _truncate_array_data(os.path.join(directory, "4"), 0.5)
    with pytest.raises(ckpt.CheckpointReadError, match="no earlier checkpoint; start a new workdir"):
        train.restore_or_init(train.setup(cfg), ckpt.Checkpointer(directory, read_only=True))
