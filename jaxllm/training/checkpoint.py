"""Checkpoints with orbax: the train state, the data position and the config, saved every N steps
(asynchronously), the last K kept; restored onto whatever mesh the target shardings describe.

A checkpoint directory only becomes visible to `latest_step` once orbax has finished and renamed it,
so a process killed mid-save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import json
import os
import re

import jax
import orbax.checkpoint as ocp
from etils import epath

from jaxllm.config import CheckpointConfig, ConfigError


class CheckpointReadError(ConfigError):
    """A checkpoint whose files cannot be read (truncated or corrupted). The message names the step,
    the previous checkpoint and how to resume from it. A ConfigError, so every command prints it as
    a one-line error; nothing on disk is changed."""


# What tensorstore says when a checkpoint's files are short or garbled: a status code, then the
# read that failed, e.g. 'OUT_OF_RANGE: Error reading "params.embed.embedding/0.0" in OCDBT
# database ...: Requested byte range [..) is not valid for value of size ..',
# 'DATA_LOSS: ... Error decoding local file ".../manifest.ocdbt"',
# 'FAILED_PRECONDITION: Error reading ...: Truncated Zstd-compressed stream'.
_TENSORSTORE_READ_FAILURE = re.compile(
    r"\b(DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION|NOT_FOUND|INVALID_ARGUMENT): .*"
    r"\bError (reading|decoding|opening)\b"
)
# Orbax's own metadata and the meta item are JSON files: truncated, they fail to decode.
_READ_FAILURE_TYPES = (json.JSONDecodeError, UnicodeDecodeError, EOFError, FileNotFoundError)


def _error_chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _read_failure(error: BaseException) -> BaseException | None:
    """The exception in `error`'s chain that says a file could not be read or decoded, if any.
    (Orbax wraps tensorstore's error in a plain Exception naming only the array slice.)"""
    for e in _error_chain(error):
        if isinstance(e, _READ_FAILURE_TYPES) or (
            isinstance(e, ValueError) and _TENSORSTORE_READ_FAILURE.search(str(e))
        ):
            return e
    return None


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
        try:
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
        except Exception as e:
            self._raise_if_unreadable(step, e, abstract_state, partial)
            raise  # anything else, e.g. a target whose tree or shapes differ from the saved one
        return restored["state"], dict(restored["meta"])

    def _raise_if_unreadable(self, step: int, error: Exception, abstract_state=None, partial=False):
        """Raises CheckpointReadError if `error`, raised restoring `step`, comes from files that
        cannot be read rather than from a target that does not match the checkpoint. Orbax reports
        both as ValueErrors (or plain Exceptions), so the mismatch is checked directly: if the
        saved tree's metadata cannot be read, the checkpoint is damaged; if it can and it differs
        from the target in structure or shapes, that is the error; if it agrees, a read failure
        in the error is damage to the array data or the meta item."""
        if abstract_state is not None:
            try:
                stored = self._stored_shapes(step)
            except Exception as metadata_error:
                raise self._read_error(step, _read_failure(error) or metadata_error) from error
            if _differs(stored, abstract_state, partial):
                return
        failure = _read_failure(error)
        if failure is not None:
            raise self._read_error(step, failure) from error

    def _stored_shapes(self, step: int) -> dict[str, tuple | None]:
        """{parameter name as orbax stores it ("params.embed.embedding"): shape} of the saved state."""
        handler = ocp.PyTreeCheckpointHandler()
        try:
            tree = handler.metadata(epath.Path(self._step_path(step)) / "state").tree
        finally:
            handler.close()
        return {
            leaf.name: _shape(leaf)
            for leaf in jax.tree.leaves(tree)
        }

    def holds(self, prefix: str, step: int | None = None) -> bool:
        """Whether the saved state of checkpoint `step` (None: the latest) has arrays under
        `prefix` (a top-level name such as "ema")."""
        return any(name.split(".")[0] == prefix for name in self._stored_shapes(self._step_or_latest(step)))

    def _step_path(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _read_error(self, step: int, failure: BaseException) -> CheckpointReadError:
        earlier = [s for s in self.all_steps() if s < step]
        where = f"move {self._step_path(step)} out of {self.directory} (or delete it)"
        if earlier:
            advice = (f"The previous checkpoint is step {earlier[-1]}: {where} and rerun to resume "
                      f"from step {earlier[-1]}")
        else:
            advice = (f"There is no earlier checkpoint; start a new workdir (or {where} and rerun "
                      "to start this run from scratch)")
        return CheckpointReadError(
            f"checkpoint step {step} in {self.directory} cannot be read ({_first_line(failure)}): "
            f"it is truncated or corrupted. {advice}"
        )

    def _step_or_latest(self, step):
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return step

    def restore_meta(self, step: int | None = None) -> dict:
        step = self._step_or_latest(step)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:
            self._raise_if_unreadable(step, e)
            raise
        return dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _shape(leaf) -> tuple | None:
    shape = getattr(leaf, "shape", None)
    return None if shape is None else tuple(shape)


def _differs(stored: dict[str, tuple | None], abstract_state, partial: bool) -> bool:
    """Whether the target tree differs from the saved one (names as orbax writes them; with
    `partial`, the target may be a part of it) or asks for other shapes."""
    names = jax.tree.leaves(ocp.tree.get_param_names(abstract_state, include_empty_nodes=False))
    wanted = dict(zip(names, map(_shape, jax.tree.leaves(abstract_state))))
    if not partial and set(wanted) != set(stored):
        return True
    return any(name not in stored or stored[name] != shape for name, shape in wanted.items())


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def holds_checkpoints(workdir: str) -> bool:
    """Whether `workdir` already has anything under checkpoints/ (a tool writing a new run there
    would replace its config and let keep-last-K clean-up delete its checkpoints)."""
    directory = checkpoint_dir(workdir)
    return os.path.isdir(directory) and bool(os.listdir(directory))


