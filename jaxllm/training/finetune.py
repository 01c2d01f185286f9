"""Fine-tuning from a pre-trained run (`init_from`): what the optimizer trains and how the model's
params are composed from the trained part and the frozen one.

- full: everything trains; the pre-trained params only initialise the run.
- probe: the family's pre-trained part (a classifier's backbone) is frozen; only the new head
  trains (a linear probe).
- lora: the pre-trained part is frozen; low-rank adapters on its kernels (compression/lora.py)
  and the new head train. Training and evaluation apply the adapters unmerged (with their
  dropout); loading the run for use merges them.

In probe and lora runs the train state holds only what trains, and its checkpoints hold only that
plus, in their config, the reference to the frozen run (`init_from`); the frozen params are read
from there at every start (restore.py does the same when loading the run).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxllm.compression import lora
from jaxllm.config import Config, ConfigError
from jaxllm.models.family import ModelFamily

MODES = ("full", "probe", "lora")
ADAPTERS, HEAD = "lora", "head"


@dataclasses.dataclass(frozen=True)
class Plan:
    cfg: Config
    backbone: str | None  # key of the pre-trained part in the family's params; None: all of them

    @property
    def mode(self) -> str:
        return self.cfg.finetune.mode

    @property
    def freezes(self) -> bool:
        return self.mode != "full"

    def split(self, params, rng=None) -> tuple[Any, Any]:
        """(trainable, frozen) parts of the model's params (boxed or not). For lora the trainable
        part gets fresh adapters (`rng` seeds them)."""
        if not self.freezes:
            return params, None
        frozen = params if self.backbone is None else params[self.backbone]
        head = {} if self.backbone is None else {k: v for k, v in params.items() if k != self.backbone}
        if self.mode == "probe":
            return head, frozen
        adapters = lora.init_adapters(rng if rng is not None else jax.random.key(0), frozen, self.cfg.finetune.lora)
        return {HEAD: head, ADAPTERS: adapters}, frozen

    def compose(self, trainable, frozen, merged: bool = True):
        """The model's params from the trainable and frozen parts. A lora run's adapters are merged
        into the frozen kernels (a plain model's params: export, generation, quantization), or with
        merged=False (training and evaluation) kept apart, applied unmerged by the layers with
        their dropout (compression/lora.py)."""
        if not self.freezes:
            return trainable
        if self.mode == "probe":
            return {**trainable, self.backbone: frozen}
        base = (lora.merge if merged else lora.adapt)(frozen, trainable[ADAPTERS], self.cfg.finetune.lora)
        return base if self.backbone is None else {**trainable[HEAD], self.backbone: base}


def plan(cfg: Config, family: ModelFamily) -> Plan:
    f = cfg.finetune
    if f.mode not in MODES:
        raise ConfigError(f"finetune.mode={f.mode!r}; choose one of {', '.join(MODES)}")
    if f.mode != "full" and not cfg.init_from:
        raise ConfigError(f"finetune.mode={f.mode} freezes pre-trained params: set init_from=<run directory>")
    if f.mode == "probe" and family.backbone is None:
        raise ConfigError(f"finetune.mode=probe trains a new head, and family={cfg.family} has none; "
                          "use family=classifier, or finetune.mode=lora or full")
    if f.mode == "lora":
        if f.lora.rank < 1:
            raise ConfigError(f"finetune.lora.rank must be >= 1, got {f.lora.rank}")
        if not 0 <= f.lora.dropout < 1:
            raise ConfigError(f"finetune.lora.dropout must be in [0, 1), got {f.lora.dropout}")
    if f.mode != "full" and cfg.distill.enabled:
        raise ConfigError(f"finetune.mode={f.mode} cannot be combined with distillation")
    return Plan(cfg, family.backbone)
