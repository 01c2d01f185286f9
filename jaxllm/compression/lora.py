"""Low-rank adapters (LoRA, Hu et al. 2021): a frozen kernel W [batch..., in..., out...] is used as

    W' = W + (alpha / rank) · A B,   A [batch..., in..., rank], B [batch..., rank, out...]

on every kernel whose path matches `LoraConfig.targets` (default: attention q, k, v, o). B starts at
zero, so a fresh adapter changes nothing. Batch axes ("layers" of a scanned stack, "expert" of MoE
kernels) get one adapter per slice; input and output axes are told apart by the kernel's logical
names as in pruning (a kernel reads or writes "embed"). A and B carry the kernel's logical names on
the axes they share with it, so they shard like their base kernel, experts over `expert` included.

Adapters live in their own tree {kernel path: {"a": A, "b": B}}. Training and evaluation use them
unmerged (`adapt`): each adapted kernel becomes an `ops.projection.Adapted` (W, A, B) in the params
the model is applied to, and its projection computes

    x W + (alpha / rank) · (dropout(x) A) B

with dropout on the adapter's input (as in PEFT), drawn from the apply's 'dropout' rng (so only
training steps drop): a key per adapted kernel, and on expert kernels per device shard of the batch
and per block of tokens (or per token, with ragged_dot). The backward pass then never forms a
frozen kernel's full gradient. Only the kernels the layers project through jaxllm.ops (attention q,
k, v, o; MLP and expert gate, up, down) can take an adapter unmerged; an adapter on any other
target (the embedding, say) is merged into its kernel instead, without dropout. `merge` folds every
adapter into the base params (the model then runs unchanged): export, generation and quantization
take merged params.
"""

from __future__ import annotations

import math
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.compression.pruning import layout_from_names
from jaxllm.config import ConfigError, LoraConfig
from jaxllm.ops.projection import Adapted
from jaxllm.training.optim import param_path


def _targets(boxed_params, cfg: LoraConfig) -> dict[str, Any]:
    """{path: (boxed leaf, layout)} of the kernels that get adapters."""
    patterns = [re.compile(p) for p in cfg.targets]
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
        name = param_path(path)
        if any(p.search(name) for p in patterns):
            if not isinstance(leaf, nn.Partitioned):
                raise ConfigError(f"finetune.lora.targets matches {name}, which carries no logical axis names")
            found[name] = (leaf, layout_from_names(name, tuple(leaf.names)))
    if not found:
        raise ConfigError(f"finetune.lora.targets={cfg.targets} matches no kernel; paths look like "
                          f"{param_path(jax.tree_util.tree_flatten_with_path(boxed_params)[0][0][0])!r}")
    return found


def init_adapters(rng, boxed_params, cfg: LoraConfig):
    """Boxed adapters (with logical names) for the target kernels of `boxed_params` (boxed
    abstract or real params): A ~ normal(0, 1/sqrt(fan-in)), B = 0."""
    targets = _targets(boxed_params, cfg)
    merged = [name for name in targets if not UNMERGED.search(name)]
    if cfg.dropout and merged:
        raise ConfigError(f"finetune.lora.dropout applies to adapters the layers apply unmerged (attention q, k, "
                          f"v, o; MLP and expert gate, up, down), and {merged[0]} is merged without it: set "
                          "finetune.lora.dropout=0 or leave it out of finetune.lora.targets")
    adapters = {}
    for k, (name, (leaf, layout)) in enumerate(sorted(targets.items())):
        shape, names = leaf.value.shape, tuple(leaf.names)
        batch, contracting = layout.batch_axes, layout.contracting_axes
        out = tuple(i for i in range(len(shape)) if i not in batch and i not in contracting)
        a_shape = tuple(shape[i] for i in batch + contracting) + (cfg.rank,)
        b_shape = tuple(shape[i] for i in batch) + (cfg.rank,) + tuple(shape[i] for i in out)
        fan_in = math.prod(shape[i] for i in contracting)
        a = jax.random.normal(jax.random.fold_in(rng, k), a_shape, jnp.float32) / math.sqrt(fan_in)
        adapters[name] = {
            "a": nn.LogicallyPartitioned(a, tuple(names[i] for i in batch + contracting) + (None,)),
            "b": nn.LogicallyPartitioned(jnp.zeros(b_shape, jnp.float32), tuple(names[i] for i in batch) + (None,)
                                + tuple(names[i] for i in out)),
        }
    return adapters


def merge(params, adapters, cfg: LoraConfig):
    """`params` with W + (alpha / rank) A B at every adapted kernel (kernels ordered batch, input,
    output axes, as every kernel in this codebase is)."""
    scale = cfg.alpha / cfg.rank

    def visit(path, w):
        name = param_path(path)
        if name not in adapters:
            return w
        a, b = adapters[name]["a"], adapters[name]["b"]
        n_batch = a.ndim + b.ndim - 2 - w.ndim  # batch axes appear in both a and b
        batch = a.shape[:n_batch]
        a_flat = a.reshape(*batch, -1, a.shape[-1])
        b_flat = b.reshape(*batch, b.shape[n_batch], -1)
        delta = jnp.matmul(a_flat.astype(jnp.float32), b_flat.astype(jnp.float32)).reshape(w.shape)
        return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(visit, params)


# Kernels the layers project through jaxllm.ops (dense, qkv, gate_up, the expert FFNs), which take
# an `Adapted` kernel.
UNMERGED = re.compile(r"(^|/)(attn/(q|k|v|o)|mlp/(shared/)?(gate|up|down))$")


def adapt(params, adapters, cfg: LoraConfig):
    """`params` with each adapted kernel W replaced by Adapted(W, A, B) (applied unmerged by the
    layers), or merged where the layers cannot take an adapter (see `UNMERGED`)."""
    unmerged = {name: ab for name, ab in adapters.items() if UNMERGED.search(name)}
    params = merge(params, {name: ab for name, ab in adapters.items() if name not in unmerged}, cfg)

    def visit(path, w):
        ab = unmerged.get(param_path(path))
        if ab is None:
            return w
        return Adapted(w, ab["a"], ab["b"], scale=cfg.alpha / cfg.rank, dropout_rate=cfg.dropout)

    return jax.tree_util.tree_map_with_path(visit, params)


def count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))
