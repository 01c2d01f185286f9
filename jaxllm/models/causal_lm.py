"""The causal language model family: a decoder (models.transformer) trained on next-token cross
entropy over packed token rows, evaluated by loss and bits per byte.

Batch format (data.pack_rows): inputs, targets, segment_ids, positions [B, L] int32 and weights
[B, L] float32 (0 on padding and across document boundaries).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxllm import data, losses
from jaxllm.config import Config
from jaxllm.layers import moe
from jaxllm.models.family import MODELS, ModelFamily
from jaxllm.models.transformer import AUX_COLLECTIONS, Transformer


def build(cfg: Config) -> Transformer:
    return Transformer(cfg.model)


def init_inputs(cfg: Config) -> tuple:
    return (jnp.zeros((1, min(cfg.train.seq_len, 8)), jnp.int32),)


def forward(model, params, batch, mutable: tuple[str, ...] = ()):
    """Logits, the MoE layers' weighted router loss (0 for a dense model), their per-layer metrics
    and the mutated collections (`mutable` plus the MoE ones). A batch carrying an "rng" key
    (training) gives it to the layers that want randomness (MoE router jitter)."""
    rngs = {"dropout": batch["rng"]} if "rng" in batch else None
    logits, variables = model.apply(
        {"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"],
        rngs=rngs, mutable=[*mutable, *AUX_COLLECTIONS],
    )
    router_loss, router_metrics = moe.collect(variables)
    return logits, router_loss, router_metrics, variables


def router_extras(router_loss, router_metrics, weight_sum) -> dict:
    """MoE router loss and metrics as the token sums a loss function's extras hold (the train step
    divides extras by the global token count); empty for a dense model."""
    if not router_metrics:
        return {}
    return {name: value * weight_sum for name, value in {"moe/loss": router_loss, **router_metrics}.items()}


def loss_fn(model, cfg: Config):
    """Next-token cross entropy (+ z-loss, + the MoE router losses) as token sums."""

    def fn(params, batch):
        logits, router_loss, router_metrics, _ = forward(model, params, batch)
        loss_sum, z_sum, weight_sum = losses.cross_entropy(
            logits, batch["targets"], batch["weights"], cfg.train.z_loss
        )
        return loss_sum + z_sum + router_loss * weight_sum, (
            loss_sum, weight_sum, router_extras(router_loss, router_metrics, weight_sum))

    return fn


def eval_fn(model, cfg: Config):
    def fn(params, batch):
        logits = model.apply({"params": params}, batch["inputs"], batch["segment_ids"], batch["positions"])
        loss_sum, _, weight_sum = losses.cross_entropy(logits, batch["targets"], batch["weights"])
        return {"loss_sum": loss_sum, "weight_sum": weight_sum}

    return fn


def bits_per_byte(loss):
    # Byte-level tokens: one token is one byte.
    return loss / math.log(2)


def eval_metrics(sums: dict) -> dict:
    loss = sums["loss_sum"] / max(sums["weight_sum"], 1.0)
    return {"eval_loss": loss, "eval_bits_per_byte": bits_per_byte(loss)}


def batches(cfg: Config, split: str) -> data.Batches:
    return data.train_batches(cfg) if split == "train" else data.eval_batches(cfg)


MODELS.register("causal_lm", ModelFamily(
    build=build, init_inputs=init_inputs, loss_fn=loss_fn, eval_fn=eval_fn, eval_metrics=eval_metrics,
    loss_metrics=lambda loss: {"bits_per_byte": bits_per_byte(loss)}, batches=batches,
))
