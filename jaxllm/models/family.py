"""Model families: what training, evaluation, checkpointing and restoring need to know about a
kind of model, so that `training.train` serves every registered family unchanged.

A family is registered once in `MODELS` and selected by the config's `family` key.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

from jaxllm.config import Config
from jaxllm.registry import Registry

# (params, batch) -> (objective, (loss_sum, weight_sum, extras)): the objective and the loss are
# sums over the batch's weighted examples (tokens for a language model); `extras` is a dict of
# further sums that are logged as metrics after division by the global weight.
LossFn = Callable[[Any, dict], tuple]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """build(cfg): the flax module. init_inputs(cfg): example positional inputs for `init` (only
    their shapes matter). loss_fn(model, cfg): the training objective (`LossFn`). eval_fn(model,
    cfg): (params, batch) -> dict of sums over one batch. eval_metrics(sums): the logged
    evaluation metrics from those sums added over batches. loss_metrics(loss, cfg): further
    metrics of the mean training loss (bits per byte, say). batches(cfg, split): the deterministic batches of
    "train" or "eval" (the batch format is the family's own). backbone: the key of the params
    that a pre-trained language model's params fill (`init_from`), None when they are all of them.
    generates: whether the family samples text (decoding.py). images: whether it has a vision tower."""

    build: Callable[[Config], nn.Module]
    init_inputs: Callable[[Config], tuple]
    loss_fn: Callable[[nn.Module, Config], LossFn]
    eval_fn: Callable[[nn.Module, Config], Callable[[Any, dict], dict]]
    eval_metrics: Callable[[dict], dict]
    loss_metrics: Callable[[Any, Config], dict]
    batches: Callable[[Config, str], Any]
    backbone: str | None = None
    generates: bool = False  # whether its runs end with a generated sample (language models)
    images: bool = False  # whether it has a vision tower (config `vision`) and images in its batches
    # The run's config with what its data decides filled in (a classifier's class names), so the
    # config saved with the checkpoints describes the model without the data at hand.
    finalize: Callable[[Config], Config] = lambda cfg: cfg
    # cfg -> {name: (global shape, dtype)} of a training batch, so a run can be compiled ahead of
    # time without its data (jaxllm.planning); None: the family cannot be planned.
    batch_spec: Callable[[Config], dict] | None = None


MODELS = Registry("family")
