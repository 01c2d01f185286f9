"""Small configs and synthetic batches shared by the tests."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from jaxllm import config as C
from jaxllm import sharding
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import train


def tiny_config(**overrides) -> C.Config:
    cfg = C.Config(
        workdir="unused",
        model=C.ModelConfig(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128),
        train=C.TrainConfig(batch_size=8, seq_len=32, steps=10, log_every=1, eval_every=5,
                            eval_batches=1, progress_bar=False),
        opt=C.OptConfig(warmup_steps=2),
        mesh=C.MeshConfig(data=1, fsdp=-1, tensor=1, expert=1),  # all 8 test devices
    )
    return dataclasses.replace(cfg, **overrides)


def with_model(cfg: C.Config, **model_overrides) -> C.Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_overrides))


def packed_batch(batch_size=8, seq_len=32, seed=0, vocab=259) -> dict[str, np.ndarray]:
    """Random tokens in rows holding two or three documents each, like the packed data."""
    rng = np.random.default_rng(seed)
    inputs = rng.integers(0, vocab, (batch_size, seq_len)).astype(np.int32)
    targets = rng.integers(0, vocab, (batch_size, seq_len)).astype(np.int32)
    segment_ids = np.ones((batch_size, seq_len), np.int32)
    positions = np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1))
    for row in range(batch_size):
        cut = int(rng.integers(4, seq_len - 4))
        segment_ids[row, cut:] = 2
        positions[row, cut:] = np.arange(seq_len - cut)
    weights = np.ones((batch_size, seq_len), np.float32)
    weights[:, -3:] = 0.0  # padding at the end of every row
    segment_ids[:, -3:] = 0
    return {"inputs": inputs, "targets": targets, "segment_ids": segment_ids,
            "positions": positions, "weights": weights}


def two_train_steps(cfg: C.Config, devices=None, steps: int = 2, batch=None):
    """(setup, state, per-step metrics) after `steps` train steps on batches `batch(k)` (default:
    packed batches 0, 1, ...), on a mesh of `devices` (default: all); the common core of the
    sharded-equals-single-device tests."""
    batch = batch or (lambda k: packed_batch(seed=k))
    s = train.setup(cfg, sharding.make_mesh(cfg.mesh, devices))
    state = train.init_state(s, jax.random.key(0))
    step = train.make_train_step(s)
    history = []
    for k in range(steps):
        state, metrics = step(state, sharding.place_batch(batch(k), s.mesh))
        history.append(jax.device_get(metrics))
    return s, state, history


def write_run(workdir: str, cfg: C.Config, params_by_step: dict) -> str:
    """A run directory as training leaves it, without training: config.json and a params-only
    checkpoint per step ({step: params}); what the restore path and the tools read."""
    os.makedirs(workdir, exist_ok=True)
    cfg = dataclasses.replace(cfg, workdir=workdir)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(C.to_json(cfg))
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir), C.CheckpointConfig(keep=10, async_save=False))
    try:
        for step, params in sorted(params_by_step.items()):
            checkpointer.save(step, {"params": params}, {"data_step": step, "config": C.to_dict(cfg)})
    finally:
        checkpointer.close()
    return workdir


def save_fresh_run(cfg: C.Config, seed: int = 0):
    """`write_run` of a freshly initialised model at step 1; returns its train state."""
    state = train.init_state(train.setup(cfg), jax.random.key(seed))
    write_run(cfg.workdir, cfg, {1: state.params})
    return state
