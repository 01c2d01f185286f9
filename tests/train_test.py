"""The training loop end to end: resume after SIGKILL equals an uninterrupted run; NaN stops the
run without touching the last good checkpoint; gradient accumulation equals one big batch."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxllm.training import checkpoint as ckpt
from jaxllm import config as C
from jaxllm import sharding
from jaxllm.training import train
from helpers import packed_batch, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _loop_config(workdir, data_dir, **train_overrides):
    cfg = tiny_config(workdir=str(workdir))
    return dataclasses.replace(
        cfg,
        mesh=C.MeshConfig(data=2, fsdp=4),
        data=dataclasses.replace(cfg.data, data_dir=data_dir),
        train=dataclasses.replace(cfg.train, **train_overrides),
        checkpoint=C.CheckpointConfig(every=5, keep=2),
    )


def _records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_loop_writes_metrics_evaluates_and_checkpoints(tmp_path, data_dir):
    cfg = _loop_config(tmp_path / "run", data_dir, steps=10, log_every=2, eval_every=5)
    seen = []
    train.train(cfg, log=seen.append)
    records = _records(cfg.workdir)
    assert [r["step"] for r in records] == [1, 2, 4, 5, 6, 8, 10]
    for key in ("loss", "bits_per_byte", "learning_rate", "grad_norm", "tokens_per_s", "step_time_s", "mfu"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert [r["step"] for r in records if "eval_loss" in r] == [5, 10]
    assert records[-1]["loss"] < records[0]["loss"]
    assert seen == records
    assert ckpt.Checkpointer(ckpt.checkpoint_dir(cfg.workdir)).all_steps() == [5, 10]
    assert os.listdir(os.path.join(cfg.workdir, "tensorboard"))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    cfg = _loop_config(tmp_path / "run", data_dir, steps=5)
    train.train(cfg)
    good = jax.device_get(train.restore_or_init(train.setup(cfg), ckpt.Checkpointer(ckpt.checkpoint_dir(cfg.workdir)))[0])
    # Resume with a learning rate that blows the weights up.
    bad = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=12),
                              opt=dataclasses.replace(cfg.opt, learning_rate=float("inf")))
    # Step 6 (the first logged step after the resume) is where the weights become non-finite.
    with pytest.raises(train.TrainingError,
                       match=r"update at step 6 made the parameters non-finite.*last good checkpoint is step 5"):
        train.train(bad)
    # Saving every step: step 6's loss is still finite (computed before its update), but the
    # update is not, and that state must not be written as a checkpoint.
    every_step = dataclasses.replace(bad, checkpoint=dataclasses.replace(cfg.checkpoint, every=1))
    with pytest.raises(train.TrainingError,
                       match=r"update at step 6 made the parameters non-finite.*last good checkpoint is step 5"):
        train.train(every_step)
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(cfg.workdir))
    assert checkpointer.all_steps() == [5]
    state, _ = train.restore_or_init(train.setup(cfg), checkpointer)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), good)


def test_resuming_with_a_different_model_is_a_clear_error_and_keeps_the_checkpoint(tmp_path, data_dir):
    cfg = _loop_config(tmp_path / "run", data_dir, steps=5)
    train.train(cfg)
    wider = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=128),
                                train=dataclasses.replace(cfg.train, steps=10))
    with pytest.raises(C.ConfigError, match="does not match"):
        train.train(wider)
    assert ckpt.Checkpointer(ckpt.checkpoint_dir(cfg.workdir)).all_steps() == [5]


def test_an_empty_eval_split_trains_without_evaluation(tmp_path, data_dir):
    cfg = _loop_config(tmp_path / "run", data_dir, steps=5, log_every=1, eval_every=2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_split=""))
    train.train(cfg)
    records = _records(cfg.workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert not any("eval_loss" in r for r in records)
    assert ckpt.Checkpointer(ckpt.checkpoint_dir(cfg.workdir)).all_steps() == [5]
    # Such a run prunes too, without the before/after validation loss.
    from jaxllm.cli import prune

    out = str(tmp_path / "pruned")
    result = prune.prune_checkpoint(cfg.workdir, out, ["sparsity=0.5"])
    assert result["eval_loss_before"] is None and abs(result["sparsity"] - 0.5) < 0.01
    assert ckpt.Checkpointer(ckpt.checkpoint_dir(out)).all_steps() == [5]


def test_a_run_with_gradient_accumulation_loads_for_sampling_and_evaluation(tmp_path, data_dir):
    """Loading runs one micro-batch of a batch the loading mesh splits: 4 micro-batches of 8
    rows fit training's 8 batch shards, but a batch of 8 (one row per device) in 4 would not."""
    from jaxllm import restore
    from jaxllm.cli import quantize as quantize_cli

    cfg = _loop_config(tmp_path / "run", data_dir, steps=1, batch_size=32, grad_accum=4)
    train.train(cfg)
    loaded, params = restore.load_params(cfg.workdir)
    assert loaded.train.grad_accum == 1 and loaded.train.batch_size == 32
    assert np.isfinite(quantize_cli.evaluate_workdir(cfg.workdir, 1)["eval_loss"])
    assert C.from_dict(C.Config, C.read_config_json(cfg.workdir)).train.grad_accum == 4


def test_gradient_accumulation_equals_one_large_batch():
    results = []
    for accum in (1, 4):
        cfg = tiny_config()
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=accum, batch_size=32))
        s = train.setup(cfg)
        state = train.init_state(s, jax.random.key(0))
        batch = sharding.place_batch(packed_batch(batch_size=32), s.mesh)
        state, metrics = train.make_train_step(s)(state, batch)
        results.append((jax.device_get(metrics), jax.device_get(state.params)))
    (m1, p1), (m4, p4) = results
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p4, p1)


def _command(workdir, data_dir, steps):
    return [
        sys.executable, os.path.join(ROOT, "experiments", "tiny_lm.py"),
        f"workdir={workdir}", f"train.steps={steps}", "train.batch_size=8", "train.seq_len=32",
        "model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.mlp_dim=128", "train.log_every=1", "train.eval_every=1000", "train.eval_batches=1",
        "checkpoint.every=10", "checkpoint.keep=2", "train.progress_bar=false", "sample_tokens=0",
        f"data.data_dir={data_dir}",
    ]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path, data_dir):
    steps = 80
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    subprocess.run(_command(full, data_dir, steps), env=_env(), check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    proc = subprocess.Popen(_command(killed, data_dir, steps), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    metrics_path = os.path.join(killed, "metrics.jsonl")
    try:
        while time.time() < deadline:
            if os.path.exists(metrics_path) and sum(1 for _ in open(metrics_path)) >= 25:
                break
            if proc.poll() is not None:
                pytest.fail("the run ended before it could be killed")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    interrupted_at = ckpt.Checkpointer(ckpt.checkpoint_dir(killed)).latest_step()
    assert interrupted_at is not None and interrupted_at < steps

    subprocess.run(_command(killed, data_dir, steps), env=_env(), check=True, timeout=300,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    full_records, resumed_records = _records(full), _records(killed)
    assert [r["step"] for r in resumed_records] == list(range(1, steps + 1))
    np.testing.assert_array_equal([r["loss"] for r in resumed_records], [r["loss"] for r in full_records])

    cfg = C.from_dict(C.Config, C.read_config_json(full))
    s = train.setup(cfg)
    a, _ = ckpt.Checkpointer(ckpt.checkpoint_dir(full)).restore(s.abstract_state)
    b, _ = ckpt.Checkpointer(ckpt.checkpoint_dir(killed)).restore(s.abstract_state)
    assert int(a.step) == int(b.step) == steps
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_loop_evaluates_the_ema_when_enabled(tmp_path, data_dir):
    cfg = _loop_config(tmp_path / "run", data_dir, steps=4, log_every=4, eval_every=4, ema_decay=0.5)
    seen = []
    state = train.train(cfg, log=seen.append)
    logged = [r for r in seen if "eval_loss" in r][-1]
    s = train.setup(cfg)
    eval_step, batches = train.make_eval_step(s), s.family.batches(cfg, "eval")
    of_ema = train.evaluate(s, eval_step, state.ema, batches, cfg.train.eval_batches)
    of_params = train.evaluate(s, eval_step, state.params, batches, cfg.train.eval_batches)
    assert logged["eval_loss"] == pytest.approx(of_ema["eval_loss"], rel=1e-6)
    assert abs(of_params["eval_loss"] - of_ema["eval_loss"]) > 1e-3
