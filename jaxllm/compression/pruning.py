"""Magnitude pruning: masks, sparsity schedules, and an optax wrapper that keeps pruned weights at
exactly zero.

A mask is a boolean pytree shaped (and, in the train state, sharded) like the params; a parameter
that is not prunable gets a scalar True instead of a full mask. Which params are prunable is a list
of regexes over parameter paths (`PruneConfig.include`).

What counts as one tensor, and which axis is the input (contracting) one, comes from the logical
axis names the params are declared with, so stacked layers and MoE experts need no special code:

- axes named "layers" or "expert" are batch axes: every slice along them is its own tensor
  (q [layers, D, H, K] is `layers` tensors of [D, H, K]; an expert kernel [layers, E, D, F] is
  layers * E tensors of [D, F]);
- every kernel in this codebase either reads the residual stream (its first non-batch axis is
  "embed": q, k, v, gate, up) or writes it (its last axis is "embed": o [H, K, D], down [F, D]). So
  the contracting axes are the leading "embed" axis in the first case and all non-batch axes but the
  last in the second. N:M groups run along the last contracting axis (for o that is head_dim, so a
  group is M consecutive entries of the flattened H*K input, as sparse matmul hardware expects).

Schedules (Zhu & Gupta 2017): one-shot prunes to the target at `start_step`; gradual recomputes the
masks at t0 + kΔt, k = 0..n, with target s_f + (s_i - s_f)(1 - kΔt/(nΔt))^3. Masks only ever grow
sparser: already pruned weights are ranked below all others.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.config import ConfigError, PruneConfig
from jaxllm.registry import Registry
from jaxllm.training.optim import param_path

BATCH_AXIS_NAMES = ("layers", "expert")


class TensorLayout(NamedTuple):
    """How a prunable parameter splits into tensors and which axes its matmul contracts."""

    path: str
    batch_axes: tuple[int, ...]
    contracting_axes: tuple[int, ...]


def layout_from_names(path: str, names: tuple[str | None, ...]) -> TensorLayout:
    batch = tuple(i for i, n in enumerate(names) if n in BATCH_AXIS_NAMES)
    rest = [i for i, n in enumerate(names) if n not in BATCH_AXIS_NAMES]
    if len(rest) < 2:
        raise ConfigError(
            f"parameter {path} with axes {names} is not a matrix; exclude it from prune.include"
        )
    if names[rest[0]] == "embed":
        contracting = (rest[0],)
    elif names[rest[-1]] == "embed":
        contracting = tuple(rest[:-1])
    else:
        raise ConfigError(
            f"cannot tell the input dimension of {path} (axes {names}): a prunable kernel must read "
            "or write the 'embed' axis; exclude it from prune.include"
        )
    return TensorLayout(path, batch, contracting)


def _is_box(x) -> bool:
    return isinstance(x, nn.Partitioned)


def layouts_for(params, cfg: PruneConfig) -> tuple[TensorLayout | None, ...]:
    """One entry per param leaf (in tree order): its layout if prunable, else None. `params` must
    carry logical axis names (nn.Partitioned boxes, as `model.init` returns them)."""
    patterns = [re.compile(p) for p in cfg.include]
    leaves, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)
    layouts = []
    for path, leaf in leaves:
        name = param_path(path)
        if not any(p.search(name) for p in patterns):
            layouts.append(None)
            continue
        if not _is_box(leaf):
            raise ConfigError(
                f"parameter {name} carries no logical axis names; pruning needs params declared "
                "with nn.with_logical_partitioning (pass boxed params to init)"
            )
        layouts.append(layout_from_names(name, tuple(leaf.names)))
    if not any(layouts):
        raise ConfigError(
            f"prune.include={cfg.include} matches no parameter; paths look like "
            f"{param_path(leaves[0][0])!r}"
        )
    return tuple(layouts)


# ---------------------------------------------------------------------------------------------
# Schedules


def is_update_step(cfg: PruneConfig, step):
    """Whether the masks are recomputed at this step (works on ints and traced arrays)."""
    if cfg.schedule == "one_shot":
        return step == cfg.start_step
    since = step - cfg.start_step
    return (since >= 0) & (since % cfg.every == 0) & (since <= cfg.num_updates * cfg.every)


def target_sparsity(cfg: PruneConfig, step):
    """The sparsity the masks have after the update at (or last before) `step`; 0 before t0."""
    if cfg.kind == "nm":
        final = 1.0 - cfg.n / cfg.m
    else:
        final = cfg.sparsity
    if cfg.schedule == "one_shot":
        return jnp.where(step >= cfg.start_step, final, 0.0)
    since = jnp.asarray(step - cfg.start_step)
    done = jnp.clip(since // cfg.every, 0, cfg.num_updates)  # mask updates so far, minus one
    remaining = 1.0 - done / cfg.num_updates
    value = final + (cfg.initial_sparsity - final) * remaining**3
    return jnp.where(since >= 0, value, 0.0)


# ---------------------------------------------------------------------------------------------
# Masks


def _batched(x, layout: TensorLayout):
    """[tensors, elements] view with the batch axes first (and the inverse)."""
    nb = len(layout.batch_axes)
    moved = jnp.moveaxis(x, layout.batch_axes, tuple(range(nb)))
    flat = moved.reshape(int(np.prod(moved.shape[:nb], dtype=int)), -1)

    def unflatten(y):
        return jnp.moveaxis(y.reshape(moved.shape), tuple(range(nb)), layout.batch_axes)

    return flat, unflatten


def _ranks(score, axis=-1):
    """Rank of every entry along `axis` in ascending order (ties broken by position)."""
    return jnp.argsort(jnp.argsort(score, axis=axis, stable=True), axis=axis, stable=True)


def _scores(w, previous):
    # Already pruned weights score below every live one, so masks only grow sparser.
    score = jnp.abs(w).astype(jnp.float32)
    return score if previous is None else jnp.where(previous, score, -1.0)


def tensor_mask(w, layout: TensorLayout, sparsity, previous=None):
    """Each tensor (slice along the batch axes) keeps all but round(sparsity * size) weights."""
    flat, unflatten = _batched(_scores(w, previous), layout)
    prune_count = jnp.round(sparsity * flat.shape[1]).astype(jnp.int32)
    return unflatten(_ranks(flat) >= prune_count)


def nm_mask(w, layout: TensorLayout, n: int, m: int):
    """Keeps the n largest of every m consecutive weights along the last contracting axis."""
    axis = layout.contracting_axes[-1]
    if w.shape[axis] % m:
        raise ConfigError(
            f"{layout.path}: input dimension {axis} has size {w.shape[axis]}, not a multiple of "
            f"prune.m={m}; choose an m that divides it or exclude the parameter"
        )
    moved = jnp.moveaxis(jnp.abs(w), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    keep = _ranks(-groups) < n
    return jnp.moveaxis(keep.reshape(moved.shape), -1, axis)


def global_masks(ws, layouts, sparsity, previous=None):
    """One threshold over all given tensors: exactly round(sparsity * total) weights pruned."""
    previous = previous or [None] * len(ws)
    scores = [_scores(w, p).reshape(-1) for w, p in zip(ws, previous)]
    flat = jnp.concatenate(scores)
    keep = _ranks(flat) >= jnp.round(sparsity * flat.size).astype(jnp.int32)
    out, start = [], 0
    for w in ws:
        out.append(keep[start:start + w.size].reshape(w.shape))
        start += w.size
    return out


PRUNE_SCHEDULES = ("one_shot", "gradual")

# prune.kind: (prunable leaves, their layouts, config, target sparsity, previous masks or Nones)
# -> one boolean mask per leaf. ("none" prunes nothing and has no masks.)
PRUNE_KINDS = Registry("prune.kind")
PRUNE_KINDS.register("magnitude", lambda ws, layouts, cfg, sparsity, prev: [
    tensor_mask(w, layout, sparsity, p) for w, layout, p in zip(ws, layouts, prev)])
PRUNE_KINDS.register("global", lambda ws, layouts, cfg, sparsity, prev: global_masks(ws, layouts, sparsity, prev))
PRUNE_KINDS.register("nm", lambda ws, layouts, cfg, sparsity, prev: [
    nm_mask(w, layout, cfg.n, cfg.m) for w, layout in zip(ws, layouts)])


def compute_masks(params, layouts, cfg: PruneConfig, sparsity, previous=None):
    """Masks for `params` (unboxed) at the given target sparsity: a pytree like params with a
    boolean array for each prunable leaf and a scalar True for the others."""
    leaves, treedef = jax.tree.flatten(params)
    prev = jax.tree.leaves(previous) if previous is not None else [None] * len(leaves)
    prev = [p if layout is not None else None for p, layout in zip(prev, layouts)]
    masks = [jnp.ones((), bool)] * len(leaves)
    chosen = [i for i, layout in enumerate(layouts) if layout is not None]
    if cfg.kind == "none":
        raise ConfigError(f"prune.kind={cfg.kind!r} has no masks")
    chosen_masks = PRUNE_KINDS.get(cfg.kind)(
        [leaves[i] for i in chosen], [layouts[i] for i in chosen], cfg, sparsity, [prev[i] for i in chosen])
    for i, mask in zip(chosen, chosen_masks):
        masks[i] = mask
    return jax.tree.unflatten(treedef, masks)


def apply_masks(params, masks):
    return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


# ---------------------------------------------------------------------------------------------
# The optimizer wrapper


@flax.struct.dataclass
class PruneState:
    count: jax.Array  # optimizer steps taken: the schedule position
    masks: Any
    inner_state: Any
    layouts: tuple = flax.struct.field(pytree_node=False, default=())


def _initial_masks(params, layouts):
    """All-True masks that keep the params' boxes (so they are sharded like the params)."""
    leaves, treedef = jax.tree.flatten(params, is_leaf=_is_box)
    masks = []
    for leaf, layout in zip(leaves, layouts):
        if layout is None:
            masks.append(jnp.ones((), bool))
        else:
            masks.append(jax.tree.map(lambda x: jnp.ones(x.shape, bool), leaf))
    return jax.tree.unflatten(treedef, masks)


def prune_wrapper(inner: optax.GradientTransformation, cfg: PruneConfig) -> optax.GradientTransformationExtraArgs:
    """Wraps `inner` so that masked weights stay exactly zero: gradients, the inner state's
    param-shaped entries (Adam moments) and the final updates are masked, and an update sets a newly
    pruned weight to zero. The masks are recomputed inside the step on the schedule's steps."""

    def init(params):
        layouts = layouts_for(params, cfg)
        return PruneState(
            count=jnp.zeros((), jnp.int32),
            masks=_initial_masks(params, layouts),
            inner_state=inner.init(params),
            layouts=layouts,
        )

    def update(updates, state: PruneState, params=None, **extra_args):
        if params is None:
            raise ValueError("pruning needs the params: call tx.update(grads, opt_state, params)")
        layouts = state.layouts
        step = state.count
        masks = jax.lax.cond(
            is_update_step(cfg, step),
            lambda: compute_masks(params, layouts, cfg, target_sparsity(cfg, step), state.masks),
            lambda: state.masks,
        )
        zero_masked = lambda x, m: jnp.where(m, x, jnp.zeros_like(x))  # noqa: E731
        updates = jax.tree.map(zero_masked, updates, masks)
        # Moments of a newly pruned weight are cleared; with zero gradients they then stay zero.
        inner_state = optax.tree_utils.tree_map_params(
            inner, lambda s, m: zero_masked(s, m) if hasattr(s, "shape") and s.ndim else s,
            state.inner_state, masks, transform_non_params=lambda x: x,
        )
        updates, inner_state = inner.update(updates, inner_state, params, **extra_args)
        # -p for pruned entries: the new weight p + (-p) is exactly zero, whatever weight decay or
        # the newly pruned weight's old value would have added.
        updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p), updates, params, masks)
        return updates, PruneState(step + 1, masks, inner_state, layouts)

    return optax.GradientTransformationExtraArgs(init, update)


def maybe_wrap(tx: optax.GradientTransformation, cfg: PruneConfig) -> optax.GradientTransformation:
    return tx if cfg.kind == "none" else prune_wrapper(tx, cfg)


# ---------------------------------------------------------------------------------------------
# Metrics


def find_prune_state(opt_state) -> PruneState | None:
    found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, PruneState))
             if isinstance(x, PruneState)]
    return found[0] if found else None


def sparsity_metrics(params, layouts) -> dict[str, jax.Array]:
    """`sparsity` (zeros / prunable weights), `nonzero_params` (over all params) and, per prunable
    param, `sparsity/<path>`: a vector with one entry per tensor (layer, expert)."""
    leaves = jax.tree.leaves(params)
    metrics = {}
    zeros, prunable = 0, 0
    # float32: exact up to 2^24 params, a close count beyond (int64 needs jax_enable_x64).
    nonzero = sum(jnp.count_nonzero(p).astype(jnp.float32) for p in leaves)
    for leaf, layout in zip(leaves, layouts):
        if layout is None:
            continue
        flat, _ = _batched(leaf == 0, layout)
        per_tensor = jnp.sum(flat, axis=1)
        zeros = zeros + jnp.sum(per_tensor)
        prunable += leaf.size
        metrics["sparsity/" + layout.path] = per_tensor / flat.shape[1]
    metrics["sparsity"] = zeros / prunable
    metrics["nonzero_params"] = nonzero
    return metrics


def train_metrics(opt_state, params) -> dict[str, jax.Array]:
    """Sparsity metrics when the optimizer prunes, else nothing (for the train step)."""
    state = find_prune_state(opt_state)
    return {} if state is None else sparsity_metrics(params, state.layouts)
