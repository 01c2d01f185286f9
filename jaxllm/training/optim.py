"""The optax chain built from OptConfig: warmup + cosine schedule, global-norm clipping, AdamW with
weight decay masked off for parameters matching `no_decay` (norms and embeddings by default), and
no updates at all (nor optimizer state) for parameters matching `freeze`."""

from __future__ import annotations

import re

import jax
import optax

from jaxllm.config import ConfigError, OptConfig


def param_path(path) -> str:
    """'blocks/attn/q' for a tree path, the form the regexes in configs are written against."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return "/".join(parts)


def path_mask(params, patterns, match: bool = True):
    """Pytree of bools: whether each parameter's path matches any regex (or not, if match=False)."""
    compiled = [re.compile(p) for p in patterns]

    def hit(path, _):
        name = param_path(path)
        return any(c.search(name) for c in compiled) == match

    return jax.tree_util.tree_map_with_path(hit, params)


def check_patterns(params, patterns, key: str) -> None:
    """Each regex in `patterns` (config `key`) must be valid and match some parameter's path."""
    paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for pattern in patterns:
        try:
            compiled = re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{key}: {pattern!r} is not a regular expression ({e})") from None
        if not any(compiled.search(p) for p in paths):
            raise ConfigError(f"{key}: {pattern!r} matches no parameter; paths look like {', '.join(paths[:3])}")


def learning_rate_schedule(opt: OptConfig, total_steps: int) -> optax.Schedule:
    warmup = min(opt.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=opt.learning_rate * opt.min_lr_ratio,
    )


def make_optimizer(opt: OptConfig, total_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(opt, total_steps)
    parts = []
    if opt.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(opt.grad_clip))
    parts.append(
        optax.adamw(
            schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
            mask=lambda params: path_mask(params, opt.no_decay, match=False),
        )
    )
    tx = optax.chain(*parts)
    if not opt.freeze:
        return tx
    # Frozen params take the zero update and keep no moments; clipping sees only trained grads.
    labels = lambda params: jax.tree.map(  # noqa: E731
        lambda frozen: "frozen" if frozen else "trained", path_mask(params, opt.freeze))
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
