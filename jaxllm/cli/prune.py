"""One-shot magnitude pruning of a trained checkpoint.

    python -m jaxllm.prune --workdir runs/tiny_lm --out runs/tiny_lm_pruned sparsity=0.5 kind=global
    python -m jaxllm.prune --workdir runs/tiny_lm --out runs/tiny_lm_2of4 kind=nm n=2 m=4

The arguments after the flags are PruneConfig fields (`kind=`, `sparsity=`, `n=`, `m=`, `include=`;
a `prune.` prefix is accepted too). Fields not given come from the run's own PruneConfig when it
was trained with pruning (its kind, sparsity, N:M and include patterns), else per-tensor
`magnitude`; a gradual schedule's settings do not apply to a one-shot prune. Restores the latest
params of --workdir, prunes them, prints a per-tensor sparsity table and the validation loss before
and after, and writes --out: a config.json (with the prune settings) and a checkpoint holding the
step and the pruned params, which `python -m jaxllm.generate --workdir OUT` samples from. It holds no
optimizer state: to fine-tune with the masks fixed, train with `prune.kind=...` instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp

from jaxllm import config as config_lib
from jaxllm import restore, sharding, validation
from jaxllm.compression import pruning
from jaxllm.config import Config, ConfigError
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import train, workdir_lock


def prune_config(saved: Config, args: Sequence[str]) -> Config:
    """The saved run's config with the command line's PruneConfig fields applied (one-shot)."""
    base = saved.prune if saved.prune.kind != "none" else dataclasses.replace(saved.prune, kind="magnitude")
    one_shot = dataclasses.replace(base, schedule="one_shot", start_step=0, initial_sparsity=0.0)
    cfg = dataclasses.replace(saved, prune=one_shot)
    cfg = config_lib.override(cfg, [a if a.startswith("prune.") else "prune." + a.lstrip("-") for a in args])
    if cfg.prune.kind == "none":
        raise ConfigError("kind=none prunes nothing; choose kind=magnitude, global or nm")
    validation.validate_prune(cfg.prune, prefix="")
    return cfg


def table(before: dict, after: dict, params_after, layouts) -> str:
    """The per-tensor sparsity table from `pruning.sparsity_metrics` before and after pruning."""
    lines = [f"{'parameter':<28} {'shape':<18} {'tensors':>7} {'sparsity':>9} {'min':>7} {'max':>7}"]
    for leaf, layout in zip(jax.tree.leaves(params_after), layouts):
        if layout is None:
            continue
        per_tensor = after["sparsity/" + layout.path]
        lines.append(
            f"{layout.path:<28} {str(tuple(leaf.shape)):<18} {len(per_tensor):>7} "
            f"{per_tensor.mean():>9.4f} {per_tensor.min():>7.4f} {per_tensor.max():>7.4f}"
        )
    lines.append(
        f"prunable weights: sparsity {before['sparsity']:.4f} -> {after['sparsity']:.4f}; nonzero "
        f"params (all): {int(before['nonzero_params']):,} -> {int(after['nonzero_params']):,}"
    )
    return "\n".join(lines)


@workdir_lock.holding("out")
def prune_checkpoint(workdir: str, out: str, args: Sequence[str], eval_batches: int | None = None) -> dict:
    """Does the work of the command; returns the losses and the sparsity reached."""
    cfg = prune_config(restore.load_config(workdir), args)
    if os.path.abspath(out) == os.path.abspath(workdir):
        raise ConfigError("--out must differ from --workdir (the original checkpoint is kept)")
    if ckpt.holds_checkpoints(out):
        raise ConfigError(f"{out} already holds checkpoints; choose a new --out directory")
    if restore.is_quantized_checkpoint(workdir):
        raise ConfigError(f"{workdir} holds an int8-quantized checkpoint; prune the float run it "
                          "came from (then quantize the pruned one: zeros stay zero)")
    mesh = sharding.make_mesh(sharding.params_mesh_config(cfg.model))
    # The saved run's optimizer is irrelevant here: only its params are restored.
    run_cfg = restore.inference_config(dataclasses.replace(cfg, prune=config_lib.PruneConfig()), mesh)
    s = train.setup(run_cfg, mesh)
    params, step, _ = restore.restore_params(ckpt.checkpoint_dir(workdir), run_cfg, mesh)

    boxed = jax.eval_shape(lambda: s.model.init(jax.random.key(0), *s.family.init_inputs(run_cfg))["params"])
    layouts = pruning.layouts_for(boxed, cfg.prune)
    target = 1.0 - cfg.prune.n / cfg.prune.m if cfg.prune.kind == "nm" else cfg.prune.sparsity

    @jax.jit
    def prune(p):
        return pruning.apply_masks(p, pruning.compute_masks(p, layouts, cfg.prune, target))

    with sharding.activate(mesh):
        pruned = prune(params)

    # One program, not dozens of eager reductions over the sharded params (each its own
    # cross-device collective).
    metrics = jax.jit(lambda p: pruning.sparsity_metrics(p, layouts))
    metrics_before, metrics_after = jax.device_get((metrics(params), metrics(pruned)))
    sparsity = float(metrics_after["sparsity"])
    num_batches = cfg.train.eval_batches if eval_batches is None else eval_batches
    if num_batches < 1:
        raise ConfigError(f"--eval_batches {num_batches} must be 1 or more")
    before = after = None
    if run_cfg.data.eval_split:  # a run trained without evaluation has no split to evaluate on
        eval_step = train.make_eval_step(s)
        batches = s.family.batches(run_cfg, "eval")
        before = train.evaluate(s, eval_step, params, batches, num_batches)["eval_loss"]
        after = train.evaluate(s, eval_step, pruned, batches, num_batches)["eval_loss"]
    if jax.process_index() == 0:
        print(table(metrics_before, metrics_after, pruned, layouts))
        if before is None:
            print(f"no validation loss: the run has no data.eval_split ({cfg.prune.kind}, sparsity {sparsity:.4f})")
        else:
            print(f"validation loss ({num_batches} batches): {before:.4f} before, {after:.4f} after "
                  f"({cfg.prune.kind}, sparsity {sparsity:.4f})")

    out_cfg = dataclasses.replace(cfg, workdir=out)
    os.makedirs(out, exist_ok=True)
    if jax.process_index() == 0:
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write(config_lib.to_json(out_cfg))
    writer = ckpt.Checkpointer(ckpt.checkpoint_dir(out))
    try:
        writer.save(step, {"step": jnp.asarray(step, jnp.int32), "params": pruned},
                    {"data_step": step, "config": config_lib.to_dict(out_cfg), "pruned_from": os.path.abspath(workdir)})
    finally:
        writer.close()
    return {"eval_loss_before": before, "eval_loss_after": after, "sparsity": sparsity, "step": step}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Prune a jaxllm checkpoint by weight magnitude.",
        epilog="further arguments: PruneConfig fields, e.g. sparsity=0.5 kind=global (or kind=nm n=2 m=4)",
    )
    parser.add_argument("--workdir", required=True, help="a run directory with checkpoints")
    parser.add_argument("--out", required=True, help="where to write the pruned checkpoint")
    parser.add_argument("--eval_batches", type=int, default=None, help="default: the run's train.eval_batches")
    args, rest = parser.parse_known_args(argv)
    not_fields = [a for a in rest if "=" not in a]
    if not_fields:
        parser.error(f"{' '.join(not_fields)}: PruneConfig fields go as key=value, e.g. sparsity=0.5 kind=global")
    try:
        prune_checkpoint(args.workdir, args.out, rest, args.eval_batches)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
