"""Knowledge distillation: a frozen teacher, restored from a checkpoint, runs inside the student's
jitted train step.

    python experiments/distill_tiny.py          # trains the teacher first if it has no checkpoint

The teacher's params are restored from an orbax checkpoint written on any mesh, straight into the
teacher's logical shardings on the student's mesh, and passed to the jitted step as an argument
(`train.make_train_step(..., frozen=...)`) under `stop_gradient`. The objective per token is
`alpha * soft + (1 - alpha) * hard (+ z-loss) + hidden_weight * hidden`; the logged `loss` and
`bits_per_byte` are the student's hard next-token loss, so they compare directly with a plain run.

Where the hidden-state projection lives: in the student's own param tree, as one stacked
`distill_projection` [pairs, student width, teacher width] next to `embed`, `blocks`, ...
(`ProjectedStudent`). So the optimizer, sharding rules and checkpoints treat it like any other
param with no change to TrainState, and a distilled student's checkpoint still loads as a plain
`Transformer`: partial restores (restore.load_params) and `Transformer.apply` ignore the extra key.

Shape legend: N layers, P layer pairs, B batch, L length, D width (S student, T teacher), V vocab.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import config as config_lib
from jaxllm import losses, restore, sharding, validation
from jaxllm.config import Config, ConfigError, DistillConfig, PruneConfig
from jaxllm.layers.base import dense_init
from jaxllm.models.causal_lm import forward, router_extras
from jaxllm.models.transformer import Transformer
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import train as train_lib

PROJECTION = "distill_projection"


class ProjectedStudent(Transformer):
    """A Transformer that also owns the learned projections of its hidden states to the teacher's
    width (when the widths differ). Its forward pass is the plain Transformer's."""

    distill: DistillConfig = DistillConfig()

    @nn.compact
    def __call__(self, tokens_BL, segment_ids_BL=None, positions_BL=None, return_hidden=False):
        out = super().__call__(tokens_BL, segment_ids_BL, positions_BL, return_hidden)
        if needs_projection(self.cfg.d_model, self.distill):
            # Created (and so trained) here; applied by the distillation loss.
            self.param(
                PROJECTION,
                dense_init(self.cfg.d_model**-0.5, (None, "embed", None)),
                (len(self.distill.layer_pairs()), self.cfg.d_model, self.distill.teacher.d_model),
                jnp.float32,
            )
        return out


def needs_projection(student_width: int, d: DistillConfig) -> bool:
    return bool(d.hidden_layers) and student_width != d.teacher.d_model


def student_model(cfg: Config) -> Transformer:
    """The student: with hidden-state pairs it also owns the learned projection(s) to the
    teacher's width, so they are trained, sharded and checkpointed with its params."""
    return ProjectedStudent(cfg.model, distill=cfg.distill) if cfg.distill.hidden_layers else Transformer(cfg.model)


def setup(cfg: Config, mesh: jax.sharding.Mesh | None = None) -> train_lib.Setup:
    """`training.train.setup` with the student (and its projection) as the model."""
    return train_lib.setup(cfg, mesh, model=student_model(cfg))


def block_outputs(intermediates, num_layers: int):
    """The sown block outputs as one [N, B, L, D] array, for scanned and unscanned stacks (a scanned
    stack of dense/MoE groups holds them as block_j, each stacked over the groups)."""
    if "blocks" in intermediates:
        blocks = intermediates["blocks"]
        if "hidden" in blocks:
            return blocks["hidden"][0]
        per_position = [blocks[f"block_{j}"]["hidden"][0] for j in range(len(blocks))]
        stacked = jnp.stack(per_position, axis=1)  # [groups, group size, B, L, D]
        return stacked.reshape(num_layers, *stacked.shape[2:])
    return jnp.stack([intermediates[f"block_{i}"]["hidden"][0] for i in range(num_layers)])


def _teacher_forward(model: nn.Module, params, batch, with_hidden: bool):
    args = (batch["inputs"], batch["segment_ids"], batch["positions"])
    if not with_hidden:
        return model.apply({"params": params}, *args), None
    logits, variables = model.apply({"params": params}, *args, mutable=["intermediates"])
    return logits, block_outputs(variables["intermediates"], model.cfg.num_layers)


def distill_loss_fn(s: train_lib.Setup) -> Callable:
    """The loss function `(params, batch, teacher_params) -> (objective, (hard_sum, weight_sum,
    extras))` for `train.make_train_step`; extras: distill_loss, hard_loss, agreement (top-1 match
    rate), objective and, with hidden-state pairs, hidden_loss."""
    cfg, d = s.cfg, s.cfg.distill
    teacher = Transformer(d.teacher)
    pairs = d.layer_pairs()
    student_layers = jnp.array([p[0] for p in pairs], jnp.int32)
    teacher_layers = jnp.array([p[1] for p in pairs], jnp.int32)

    def loss_fn(params, batch, teacher_params):
        teacher_params = jax.lax.stop_gradient(teacher_params)
        logits_S, router_loss, router_metrics, variables = forward(
            s.model, params, batch, mutable=("intermediates",) if pairs else ())
        if pairs:
            hidden_S = block_outputs(variables["intermediates"], s.model.cfg.num_layers)
        logits_T, hidden_T = _teacher_forward(teacher, teacher_params, batch, bool(pairs))
        targets, weights = batch["targets"], batch["weights"]
        hard_sum, z_sum, weight_sum = losses.cross_entropy(logits_S, targets, weights, cfg.train.z_loss)
        soft_sum, _ = losses.distillation_loss(
            logits_S, logits_T, weights, d.loss, d.temperature, d.beta, d.top_k
        )
        # A MoE student's router losses join the objective as in plain training.
        objective = d.alpha * soft_sum + (1.0 - d.alpha) * hard_sum + z_sum + router_loss * weight_sum
        extras = {
            "distill_loss": soft_sum,
            "hard_loss": hard_sum,
            "agreement": losses.top1_agreement(logits_S, logits_T, weights),
            **router_extras(router_loss, router_metrics, weight_sum),
        }
        if pairs:
            chosen_PBLS = hidden_S[student_layers]
            if PROJECTION in params:
                chosen_PBLS = jnp.einsum(
                    "pbls,pst->pblt", chosen_PBLS, params[PROJECTION].astype(chosen_PBLS.dtype)
                )
            hidden_sum, _ = losses.hidden_state_loss(
                chosen_PBLS, hidden_T[teacher_layers], weights, d.hidden_loss
            )
            hidden_sum = hidden_sum / len(pairs)  # the mean over pairs, per token
            objective = objective + d.hidden_weight * hidden_sum
            extras["hidden_loss"] = hidden_sum
        extras["objective"] = objective
        return objective, (hard_sum, weight_sum, extras)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# The teacher


def teacher_checkpoint_dir(d: DistillConfig) -> str:
    """<teacher_workdir>/checkpoints if it exists, else teacher_workdir itself (a checkpoints dir)."""
    nested = ckpt.checkpoint_dir(d.teacher_workdir)
    return nested if os.path.isdir(nested) else os.path.abspath(d.teacher_workdir)


def has_teacher_checkpoint(d: DistillConfig) -> bool:
    directory = teacher_checkpoint_dir(d)
    if not os.path.isdir(directory):
        return False
    checkpointer = ckpt.Checkpointer(directory, read_only=True)
    try:
        return checkpointer.latest_step() is not None
    finally:
        checkpointer.close()


def teacher_training_config(cfg: Config) -> Config:
    """The config `distill.teacher_train_steps` trains a missing teacher with: this run's data,
    optimizer, batch and mesh, the teacher's model, its own workdir. The student's pruning is not
    the teacher's, and the teacher always ends with a checkpoint (the student restores it), even
    when the student's checkpointing is off."""
    d = cfg.distill
    return dataclasses.replace(
        cfg,
        workdir=d.teacher_workdir,
        model=d.teacher,
        distill=DistillConfig(),
        prune=PruneConfig(),
        train=dataclasses.replace(cfg.train, steps=d.teacher_train_steps),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=cfg.checkpoint.every or d.teacher_train_steps),
    )


def _missing_teacher_error(cfg: Config) -> FileNotFoundError:
    d = cfg.distill
    t = d.teacher
    return FileNotFoundError(
        f"no teacher checkpoint: looked in {teacher_checkpoint_dir(d)} (distill.teacher_workdir="
        f"{d.teacher_workdir}). Train a teacher there first, e.g. `python experiments/tiny_lm.py "
        f"workdir={d.teacher_workdir} model.d_model={t.d_model} model.num_layers={t.num_layers} "
        f"model.num_heads={t.num_heads} model.mlp_dim={t.mlp_dim}` (its model must equal "
        "distill.teacher), or set distill.teacher_train_steps=N to have this run train it"
    )


def restore_teacher(cfg: Config, mesh: jax.sharding.Mesh):
    """The teacher's params from its checkpoint, in the teacher's logical shardings on `mesh` (the
    student's), whatever mesh wrote them. Only the params are read (partial restore)."""
    d = cfg.distill
    teacher_cfg = dataclasses.replace(cfg, model=d.teacher, distill=DistillConfig())
    try:
        sharding.check_divisibility(teacher_cfg, mesh)
    except ConfigError as e:
        raise ConfigError(f"the teacher does not fit the student's mesh: {e}") from None
    if not has_teacher_checkpoint(d):
        raise _missing_teacher_error(cfg)
    directory = teacher_checkpoint_dir(d)
    step = None if d.teacher_step < 0 else d.teacher_step
    checkpointer = ckpt.Checkpointer(directory, read_only=True)
    try:
        saved_model = checkpointer.restore_meta(step).get("config", {}).get("model")
    finally:
        checkpointer.close()
    if saved_model is not None:
        saved = config_lib.from_dict(config_lib.ModelConfig, saved_model)
        # Layout and kernel options (scan, remat, dtype, attention kernel) change no parameter;
        # the rest must agree.
        layout = dict(scan_layers=d.teacher.scan_layers, remat=d.teacher.remat, dtype=d.teacher.dtype,
                      attention_impl=d.teacher.attention_impl)
        if dataclasses.replace(saved, **layout) != d.teacher:
            diff = {
                k: (v, getattr(d.teacher, k))
                for k, v in dataclasses.asdict(saved).items()
                if k not in layout and v != getattr(d.teacher, k)
            }
            raise ConfigError(
                f"distill.teacher differs from the model the checkpoint in {directory} was trained "
                f"with (field: (saved, configured)): {diff}"
            )
    params, _, _ = restore.restore_params(directory, teacher_cfg, mesh, step)
    return params


def make_distill_step(s: train_lib.Setup) -> Callable:
    """A step builder for `train.train`: restores the teacher onto the run's mesh and returns the
    jitted distillation step `run(state, batch)`."""
    teacher_params = restore_teacher(s.cfg, s.mesh)
    return train_lib.make_train_step(s, distill_loss_fn(s), frozen=teacher_params)


def train(cfg: Config, log: Callable[[dict], None] | None = None, mesh=None):
    """Distils into the student described by `cfg`; trains the teacher first when it has no
    checkpoint and `distill.teacher_train_steps` > 0. Returns the student's final TrainState."""
    validation.validate(cfg)
    if not cfg.distill.enabled:
        raise ConfigError("distill.teacher_workdir is empty: set it to the teacher's run directory")
    if not has_teacher_checkpoint(cfg.distill):
        if cfg.distill.teacher_train_steps <= 0:
            raise _missing_teacher_error(cfg)
        train_lib.train(teacher_training_config(cfg), log, mesh)
    return train_lib.train(cfg, log, mesh, make_step=make_distill_step, model=student_model(cfg))
