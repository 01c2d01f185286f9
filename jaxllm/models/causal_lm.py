"""The causal language model family: a decoder (models.transformer) trained on next-token cross
entropy over packed token rows, evaluated by loss and bits per byte.

Batch format (data.pack_rows): inputs, targets, segment_ids, positions [B, L] int32 and weights
[B, L] float32 (0 on padding and across document boundaries).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxllm import data, losses
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.config import Config
from jaxllm.layers import moe
from jaxllm.models.family import MODELS, ModelFamily
from jaxllm.models.transformer import AUX_COLLECTIONS, Transformer, output_logits, output_table


def build(cfg: Config) -> Transformer:
    return Transformer(cfg.model)


def init_inputs(cfg: Config) -> tuple:
    return (jnp.zeros((1, min(cfg.train.seq_len, 8)), jnp.int32),)


def text_inputs(batch) -> tuple:
    """The module's positional inputs in a batch of text (other families pass their own)."""
    return batch["inputs"], batch["segment_ids"], batch["positions"]


def forward(model, params, batch, mutable: tuple[str, ...] = (), model_inputs=text_inputs):
    """Logits, the MoE layers' weighted router loss (0 for a dense model), their per-layer metrics
    and the mutated collections (`mutable` plus the MoE ones). A batch carrying an "rng" key
    (training) gives it to the layers that want randomness (MoE router jitter, LoRA dropout)."""
    rngs = {"dropout": batch["rng"]} if "rng" in batch else None
    logits, variables = model.apply(
        {"params": params}, *model_inputs(batch), rngs=rngs, mutable=[*mutable, *AUX_COLLECTIONS],
    )
    router_loss, router_metrics = moe.collect(variables)
    return logits, router_loss, router_metrics, variables


def router_extras(router_loss, router_metrics, weight_sum) -> dict:
    """MoE router loss and metrics as the token sums a loss function's extras hold (the train step
    divides extras by the global token count); empty for a dense model."""
    if not router_metrics:
        return {}
    return {name: value * weight_sum for name, value in {"moe/loss": router_loss, **router_metrics}.items()}


def chunked_cross_entropy(cfg: Config, table, hidden_BLD, targets_BL, weights_BL):
    """losses.cross_entropy of the logits of `hidden_BLD`, computed train.loss_chunk positions at
    a time: one chunk's logits exist at once. Returns (loss_sum + z_sum, loss_sum, z_sum,
    weight_sum); only the first carries a gradient.

    Each chunk's gradients with respect to its hidden states and the table are taken in the
    forward pass, while its logits exist, and kept for the backward pass ([B, L, D] and one table):
    nothing is recomputed, so the chunked loss costs the FLOPs of whole logits (rematerialising
    the chunks instead would add one logits matmul, 2 % of a Llama-3-8B step)."""
    B, L, D = hidden_BLD.shape
    C = cfg.train.loss_chunk
    chunks = lambda x: x.reshape(B, L // C, C, *x.shape[2:]).swapaxes(0, 1)  # noqa: E731  [L/C, B, C, ...]

    def chunk_sums(table, h_BCD, targets_BC, weights_BC):
        loss, z, weight = losses.cross_entropy(output_logits(cfg.model, table, h_BCD), targets_BC, weights_BC,
                                               cfg.train.z_loss)
        return loss + z, (loss, z, weight)

    def scan_chunks(step, init, hidden_BLD):
        return jax.lax.scan(step, init, (chunks(hidden_BLD), chunks(targets_BL), chunks(weights_BL)))

    def add(sums, total_parts):
        total, parts = total_parts
        return jax.tree.map(jnp.add, sums, (total, *parts))

    zero = jnp.zeros((), jnp.float32)

    @jax.custom_vjp
    def sums_of(table, hidden_BLD):  # without a gradient: the sums alone
        return scan_chunks(lambda sums, xs: (add(sums, chunk_sums(table, *xs)), None), (zero,) * 4, hidden_BLD)[0]

    def forward(table, hidden_BLD):
        def body(carry, xs):
            sums, d_table = carry
            total_parts, (d_table_chunk, d_h_BCD) = jax.value_and_grad(
                chunk_sums, argnums=(0, 1), has_aux=True)(table, *xs)
            return (add(sums, total_parts), d_table + d_table_chunk), d_h_BCD

        (sums, d_table), d_hidden = scan_chunks(body, ((zero,) * 4, jnp.zeros_like(table)), hidden_BLD)
        return sums, (d_table, d_hidden.swapaxes(0, 1).reshape(B, L, D))

    def backward(grads, g_sums):
        d_table, d_hidden_BLD = grads
        g_total = g_sums[0]
        return (d_table * g_total).astype(table.dtype), (d_hidden_BLD * g_total).astype(hidden_BLD.dtype)

    sums_of.defvjp(forward, backward)
    total, *parts = sums_of(table, hidden_BLD)
    return (total, *(jax.lax.stop_gradient(x) for x in parts))


def loss_fn(model, cfg: Config, model_inputs=text_inputs):
    """Next-token cross entropy (+ z-loss, + the MoE router losses) as token sums, over the
    positions the batch's weights select."""

    def fn(params, batch):
        if cfg.train.loss_chunk:
            hidden, router_loss, router_metrics, _ = forward(model.clone(lm_head=False), params, batch,
                                                             model_inputs=model_inputs)
            total, loss_sum, z_sum, weight_sum = chunked_cross_entropy(
                cfg, output_table(cfg.model, params), hidden, batch["targets"], batch["weights"])
        else:
            logits, router_loss, router_metrics, _ = forward(model, params, batch, model_inputs=model_inputs)
            loss_sum, z_sum, weight_sum = losses.cross_entropy(
                logits, batch["targets"], batch["weights"], cfg.train.z_loss
            )
            total = loss_sum + z_sum
        return total + router_loss * weight_sum, (
            loss_sum, weight_sum, router_extras(router_loss, router_metrics, weight_sum))

    return fn


def token_bytes(cfg: Config):
    """[V] float32: the UTF-8 bytes each token id stands for (0 for special and unused ids)."""
    table = tokenizer_lib.load(cfg.model.tokenizer).token_bytes()
    return jnp.zeros(cfg.model.vocab_size, jnp.float32).at[:len(table)].set(table)


def eval_sums(logits, batch, token_bytes_V) -> dict:
    """Token loss sums and the UTF-8 bytes the predicted tokens stand for, so that bits per byte
    compares models with different tokenizers."""
    loss_sum, _, weight_sum = losses.cross_entropy(logits, batch["targets"], batch["weights"])
    byte_sum = jnp.sum(batch["weights"] * token_bytes_V[batch["targets"]])
    return {"loss_sum": loss_sum, "weight_sum": weight_sum, "byte_sum": byte_sum}


def eval_fn(model, cfg: Config, model_inputs=text_inputs):
    token_bytes_V = token_bytes(cfg)

    def fn(params, batch):
        logits = model.apply({"params": params}, *model_inputs(batch))
        return eval_sums(logits, batch, token_bytes_V)

    return fn


def eval_metrics(sums: dict) -> dict:
    loss = sums["loss_sum"] / max(sums["weight_sum"], 1.0)
    return {"eval_loss": loss, "eval_bits_per_byte": sums["loss_sum"] / math.log(2) / max(sums["byte_sum"], 1.0)}


def loss_metrics(loss, cfg: Config) -> dict:
    # Byte-level tokens are one byte each; with another tokenizer bytes per token vary, and the
    # evaluation reports bits per byte.
    name = "bits_per_byte" if cfg.model.tokenizer == "bytes" else "bits_per_token"
    return {name: loss / math.log(2)}


def batch_spec(cfg: Config) -> dict:
    rows = (cfg.train.batch_size, cfg.train.seq_len)
    return {**{k: (rows, jnp.int32) for k in ("inputs", "targets", "segment_ids", "positions")},
            "weights": (rows, jnp.float32)}


def batches(cfg: Config, split: str) -> data.Batches:
    return data.train_batches(cfg) if split == "train" else data.eval_batches(cfg)


MODELS.register("causal_lm", ModelFamily(
    build=build, init_inputs=init_inputs, loss_fn=loss_fn, eval_fn=eval_fn, eval_metrics=eval_metrics,
    loss_metrics=loss_metrics, batches=batches, generates=True, batch_spec=batch_spec,
))
