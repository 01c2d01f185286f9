"""Weight averaging (model soups, Wortsman et al. 2022): the uniform soup of several runs of one
architecture, the greedy soup, and the average of one run's last K checkpoints, each written as
a new run directory that every tool accepts (generate, classify, ensemble, quantize, ...).

Greedy soup (the model-soups rule): ingredients sorted by their held-out score, best first; each
next one is kept only if the average of the kept ones plus it scores strictly better than the
kept ones alone. The score is (accuracy, -loss) for a classifier, -loss for a language model, on
held-out validation batches that the caller keeps apart from those it reports.

Ingredients must have the same params tree and shapes, be float (not int8), and, when any is a
LoRA or probe run (its adapters merged on restore), all start from one `init_from` base.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxllm import config as config_lib
from jaxllm import restore, sharding, validation
from jaxllm.compression import quantize
from jaxllm.config import Config, ConfigError, FinetuneConfig
from jaxllm.models import MODELS
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import finetune, train, workdir_lock

META_KEY = "soup"


@jax.jit
def average(trees: Sequence[Any]):
    """The leafwise mean of params trees of one structure (each leaf in its own dtype)."""
    return jax.tree.map(lambda *xs: (sum(x.astype(jnp.float32) for x in xs) / len(xs)).astype(xs[0].dtype), *trees)


def _shapes(params) -> dict[str, tuple]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): (tuple(x.shape), str(x.dtype))
            for path, x in jax.tree_util.tree_leaves_with_path(params)}


def check_compatible(workdirs: Sequence[str], cfgs: Sequence[Config], params: Sequence[Any]) -> None:
    """A clear error unless every ingredient has the first one's params tree, shapes and base."""
    first = _shapes(params[0])
    adapts = any(finetune.plan(c, MODELS.get(c.family)).freezes for c in cfgs)
    base = os.path.abspath(cfgs[0].init_from) if cfgs[0].init_from else "(none)"
    for workdir, cfg, p in zip(workdirs[1:], cfgs[1:], params[1:]):
        if cfg.family != cfgs[0].family:
            raise ConfigError(f"{workdir} is a {cfg.family} run and {workdirs[0]} a {cfgs[0].family} run; "
                              "a soup averages runs of one architecture")
        theirs = os.path.abspath(cfg.init_from) if cfg.init_from else "(none)"
        # LoRA and probe runs are their base plus a small change: only one base makes them comparable.
        if adapts and theirs != base:
            raise ConfigError(f"{workdir} starts from {theirs} and {workdirs[0]} from {base}; a soup "
                              "with LoRA or probe runs needs one base (init_from)")
        shapes = _shapes(p)
        if shapes != first:
            diff = sorted(set(shapes.items()) ^ set(first.items()))
            where = diff[0][0] if diff else "the tree"
            raise ConfigError(f"{workdir} does not have the params of {workdirs[0]} (first difference at "
                              f"{where}: {shapes.get(where)} vs {first.get(where)}); a soup needs one architecture")


def load_ingredients(workdirs: Sequence[str], steps: Sequence[int | None] | None = None, devices=None):
    """(cfgs, params list, mesh): the ingredients' float params on one mesh (the first's)."""
    if not workdirs:
        raise ConfigError("a soup needs at least one --workdir")
    steps = list(steps) if steps is not None else [None] * len(workdirs)
    cfgs = [restore.load_config(w) for w in workdirs]
    n = len(devices) if devices is not None else None
    mesh = sharding.make_mesh(sharding.params_mesh_config(cfgs[0].model, 1, n), devices)
    cfgs = [restore.inference_config(c, mesh) for c in cfgs]
    params = []
    for workdir, cfg, step in zip(workdirs, cfgs, steps):
        if restore.checkpoint_meta(workdir, step).get(quantize.META_KEY) is not None:
            raise ConfigError(f"{workdir} holds an int8-quantized checkpoint; soup the float runs and "
                              "quantize the soup")
        validation.validate(cfg)
        restore.check_mesh(cfg, mesh)
        params.append(restore.restore_params(ckpt.checkpoint_dir(workdir), cfg, mesh, step)[0])
    check_compatible(workdirs, cfgs, params)
    return cfgs, params, mesh


def score(metrics: dict) -> tuple:
    """Greedy soup's ordering: higher is better."""
    if "eval_accuracy" in metrics:
        return (metrics["eval_accuracy"], -metrics["eval_loss"])
    return (-metrics["eval_loss"],)


def greedy(params: Sequence[Any], evaluate: Callable[[Any], dict]) -> tuple[list[int], Any, list[dict]]:
    """(kept ingredient indices in the order added, the soup's params, every ingredient's metrics):
    the model-soups greedy rule with `evaluate(params) -> metrics` on held-out data."""
    metrics = [evaluate(p) for p in params]
    order = sorted(range(len(params)), key=lambda i: score(metrics[i]), reverse=True)
    kept, soup, best = [order[0]], params[order[0]], score(metrics[order[0]])
    for i in order[1:]:
        candidate = average([params[j] for j in kept] + [params[i]])
        candidate_score = score(evaluate(candidate))
        if candidate_score > best:
            kept, soup, best = kept + [i], candidate, candidate_score
    return kept, soup, metrics


def evaluator(cfg: Config, mesh: jax.sharding.Mesh, params_like, indices: Sequence[int]):
    """params -> the family's validation metrics over the validation batches `indices`."""
    s = train.setup(soup_config(cfg), mesh)
    eval_step = train.make_eval_step(s, param_shardings=jax.tree.map(lambda x: x.sharding, params_like))
    selected = _Selected(s.family.batches(s.cfg, "eval"), indices)

    def run(params) -> dict:
        return train.evaluate(s, eval_step, params, selected, len(indices))

    return run


class _Selected:
    """The batches `indices` of `batches`, as batches 0, 1, ... (train.evaluate reads 0..n-1)."""

    def __init__(self, batches, indices: Sequence[int]):
        self.batches, self.indices, self.batch_size = batches, list(indices), batches.batch_size

    def batch_rows(self, step: int, lo: int, hi: int):
        return self.batches.batch_rows(self.indices[step], lo, hi)


def soup_config(cfg: Config) -> Config:
    """The config a soup is saved with: its params are the whole model's (LoRA adapters merged),
    so it restores as a full fine-tune."""
    return dataclasses.replace(cfg, finetune=FinetuneConfig())


def write(out: str, source: str, cfg: Config, params, step: int, record: dict) -> None:
    """A run directory `out`: `source`'s config.json (as a full model) and a params-only checkpoint."""
    if ckpt.holds_checkpoints(out):
        raise ConfigError(f"{out} already holds checkpoints; choose an empty --out")
    os.makedirs(out, exist_ok=True)
    saved = soup_config(config_lib.from_dict(Config, config_lib.read_config_json(source)))
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(config_lib.to_json(dataclasses.replace(saved, workdir=os.path.abspath(out))))
    meta = {"data_step": step, "config": config_lib.to_dict(soup_config(cfg)), META_KEY: record}
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(out))
    try:
        checkpointer.save(step, {"params": params}, meta)
    finally:
        checkpointer.close()


def last_checkpoints(workdir: str, k: int) -> list[int]:
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir), read_only=True)
    try:
        steps = sorted(checkpointer.all_steps())
    finally:
        checkpointer.close()
    if k < 1 or k > len(steps):
        raise ConfigError(f"--last {k}: {workdir} keeps {len(steps)} checkpoints ({steps}); choose 1..{len(steps)}")
    return steps[-k:]


@workdir_lock.holding("out")
def make_soup(workdirs: Sequence[str], out: str, greedy_soup: bool = False, held_out: Sequence[int] = (0, 1, 2, 3),
              devices=None) -> dict:
    """Writes the uniform (or greedy) soup of `workdirs` to `out`; returns its record (with each
    ingredient's metrics on the held-out validation batches `held_out` and the soup's, for a
    greedy soup)."""
    if os.path.abspath(out) in {os.path.abspath(w) for w in workdirs}:
        raise ConfigError("--out must be a new run directory, not one of the ingredients")
    cfgs, params, mesh = load_ingredients(workdirs, devices=devices)
    step = max(restore.checkpoint_meta(w).get("data_step", 0) for w in workdirs)
    record: dict = {"kind": "greedy" if greedy_soup else "uniform", "ingredients": [os.path.abspath(w) for w in workdirs]}
    if greedy_soup:
        run = evaluator(cfgs[0], mesh, params[0], held_out)
        kept, soup, metrics = greedy(params, run)
        record.update(kept=[record["ingredients"][i] for i in kept], held_out_batches=list(held_out),
                      held_out=[_scalars(m) for m in metrics], soup_held_out=_scalars(run(soup)))
    else:
        soup = average(params)
    write(out, workdirs[0], cfgs[0], soup, step, record)
    return record


@workdir_lock.holding("out")
def average_last(workdir: str, out: str, k: int, devices=None) -> dict:
    """Writes the mean of `workdir`'s last `k` checkpoints to `out`."""
    if os.path.abspath(out) == os.path.abspath(workdir):
        raise ConfigError("--out must be a new run directory, not --workdir")
    steps = last_checkpoints(workdir, k)
    cfgs, params, _ = load_ingredients([workdir] * k, steps, devices)
    record = {"kind": "last_checkpoints", "ingredients": [os.path.abspath(workdir)], "steps": steps}
    write(out, workdir, cfgs[0], average(params), steps[-1], record)
    return record


def _scalars(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, float)}
