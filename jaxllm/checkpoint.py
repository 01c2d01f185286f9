"""Checkpoints with orbax: the train state, the data position and the config, saved every N steps
(asynchronously), the last K kept; restored onto whatever mesh the target shardings describe.

A checkpoint directory only becomes visible to `latest_step` once orbax has finished and renamed it,
so a process killed mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

from jaxllm.config import CheckpointConfig


def abstract_like(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings: what orbax restores into."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class Checkpointer:
    def __init__(self, directory: str, cfg: CheckpointConfig = CheckpointConfig(), read_only=False):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep,
            enable_async_checkpointing=cfg.async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict) -> None:
        """Saves `state` (any pytree of arrays) and `meta` (JSON: data position, config, ...)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def restore(self, abstract_state, step: int | None = None, partial: bool = False):
        """Restores (state, meta). `abstract_state` gives shapes, dtypes and target shardings, so
        the arrays are read straight into the layout of the current mesh, whatever mesh wrote them.
        With `partial`, `abstract_state` may be a subtree, e.g. {"params": ...}."""
        step = self._step_or_latest(step)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract_state,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
                    partial_restore=partial,
                ),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], dict(restored["meta"])

    def _step_or_latest(self, step):
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def restore_meta(self, step: int | None = None) -> dict:
        step = self._step_or_latest(step)
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def holds_checkpoints(workdir: str) -> bool:
    """Whether `workdir` already has anything under checkpoints/ (a tool writing a new run there
    would replace its config and let keep-last-K clean-up delete its checkpoints)."""
    directory = checkpoint_dir(workdir)
    return os.path.isdir(directory) and bool(os.listdir(directory))


def read_config_json(workdir: str) -> dict:
    """The config a run was started with (written to <workdir>/config.json at start)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a jaxllm run directory (run an experiment with "
            f"workdir={workdir} first)"
        )
    with open(path) as f:
        return json.load(f)
