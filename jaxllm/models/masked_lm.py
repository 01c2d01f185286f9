"""The masked-LM family: a bidirectional encoder (BERT, RoBERTa) trained to predict BERT-masked
tokens (jaxllm/masking.py), evaluated by masked-token loss and accuracy.

    x = embed(tokens) + pos[positions] + type[token_types];  x = norm(x)  (model.embed_norm)
    for each block: the decoder's block (models.transformer), its attention kind bidirectional
    logits = norm(gelu(x W_t + b_t)) Eᵀ + b_V        (the MLM head, tied to the embedding)

The blocks are models.transformer's, from the same registries (norm kind and placement: post for
BERT, pre for a pre-LN encoder; MLP kind gelu with model.mlp_bias; position kind learned), scanned
and rematerialised as the config says. The encoder is the root module, its params laid out as a
decoder's plus `token_type_embed` and `mlm_head`, so a classifier's "backbone" (models/classifier.py,
classifier.backbone=encoder) is filled from a masked-LM run by `init_from`.

Shape legend as in models/transformer.py; T token types.

Batch format (masking.py): inputs (masked), targets (original), segment_ids, positions int32
[B, L], weights float32 [B, L] (1 on the chosen tokens).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import losses, masking
from jaxllm.config import Config, ModelConfig
from jaxllm.layers.attention import layer_contexts
from jaxllm.layers.base import POSITION_KINDS, Embed, PositionEmbed, compute_dtype, constrain, dense_init, norm
from jaxllm.models.causal_lm import batch_spec, forward, router_extras, text_inputs  # the same token rows
from jaxllm.models.family import MODELS, ModelFamily
from jaxllm.models.transformer import NORM_PLACEMENTS, block_stack
from jaxllm.sharding import ACT_EMBED, ACT_VOCAB, BATCH, LENGTH


class TokenTypeEmbed(nn.Module):
    """BERT's token-type (segment A/B) table [model.type_vocab_size, D], added to the embeddings."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, token_types_BL):
        table_TD = self.param("embedding", dense_init(self.cfg.init_std, (None, "embed")),
                              (self.cfg.type_vocab_size, self.cfg.d_model), jnp.float32)
        types_BLD = jnp.take(constrain(table_TD, (None, "embed")), token_types_BL, axis=0).astype(x_BLD.dtype)
        return constrain(x_BLD + types_BLD, (BATCH, LENGTH, ACT_EMBED))


class MlmHead(nn.Module):
    """BERT's prediction head: a dense + gelu + norm transform, then the tied output projection
    with its own bias over the vocabulary."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, table_VD):
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        w_DD = self.param("dense", dense_init(cfg.init_std, ("embed", None)), (cfg.d_model, cfg.d_model), jnp.float32)
        b_D = self.param("dense_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)),
                         (cfg.d_model,), jnp.float32)
        b_V = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                         (cfg.vocab_size,), jnp.float32)
        h_BLD = jnp.einsum("bld,de->ble", x_BLD, w_DD.astype(dtype)) + b_D.astype(dtype)
        h_BLD = norm(cfg, "norm")(jax.nn.gelu(h_BLD, approximate=False))
        logits_BLV = jnp.einsum("bld,vd->blv", h_BLD, table_VD.astype(dtype))
        logits_BLV = constrain(logits_BLV, (BATCH, LENGTH, ACT_VOCAB)).astype(jnp.float32)
        return logits_BLV + b_V


class Encoder(nn.Module):
    """Bidirectional encoder; with `mlm_head` returns float32 MLM logits [B, L, V], else the final
    hidden states [B, L, D] (a backbone for a task head)."""

    cfg: ModelConfig
    mlm_head: bool = True

    @nn.compact
    def __call__(self, tokens_BL, segment_ids_BL=None, positions_BL=None, token_types_BL=None):
        cfg = self.cfg
        B, L = tokens_BL.shape
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones((B, L), jnp.int32)
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        embed = Embed(cfg, name="embed")
        x_BLD = embed(tokens_BL)
        if POSITION_KINDS.get(cfg.position_kind).learned:
            x_BLD = PositionEmbed(cfg, name="position_embed")(x_BLD, positions_BL)
        if cfg.type_vocab_size:  # absent types are type 0, as in BERT
            types_BL = jnp.zeros((B, L), jnp.int32) if token_types_BL is None else token_types_BL
            x_BLD = TokenTypeEmbed(cfg, name="token_type_embed")(x_BLD, types_BL)
        if cfg.embed_norm:
            x_BLD = norm(cfg, "embed_norm")(x_BLD)
        contexts = layer_contexts(cfg, segment_ids_BL, positions_BL, False)
        x_BLD = block_stack(cfg, False, x_BLD, segment_ids_BL, positions_BL, contexts)
        if NORM_PLACEMENTS.get(cfg.norm_placement).final_norm:
            x_BLD = norm(cfg, "final_norm")(x_BLD)
        if not self.mlm_head:
            return x_BLD
        return MlmHead(cfg, name="mlm_head")(x_BLD, embed.embedding)


def build(cfg: Config) -> Encoder:
    return Encoder(cfg.model)


def init_inputs(cfg: Config) -> tuple:
    return (jnp.zeros((1, min(cfg.train.seq_len, 8)), jnp.int32),)


def mlm_sums(logits_BLV, batch) -> tuple:
    """(loss sum, chosen-token count, correctly predicted chosen tokens)."""
    loss_sum, _, weight_sum = losses.cross_entropy(logits_BLV, batch["targets"], batch["weights"])
    correct = jnp.sum((jnp.argmax(logits_BLV, -1) == batch["targets"]) * batch["weights"])
    return loss_sum, weight_sum, correct


def loss_fn(model, cfg: Config, model_inputs=text_inputs):
    """Cross entropy on the chosen tokens (+ the MoE router losses); masked-token accuracy as a metric."""

    def fn(params, batch):
        logits, router_loss, router_metrics, _ = forward(model, params, batch, model_inputs=model_inputs)
        loss_sum, weight_sum, correct = mlm_sums(logits, batch)
        extras = {"accuracy": correct, **router_extras(router_loss, router_metrics, weight_sum)}
        return loss_sum + router_loss * weight_sum, (loss_sum, weight_sum, extras)

    return fn


def eval_fn(model, cfg: Config, model_inputs=text_inputs):
    def fn(params, batch):
        loss_sum, weight_sum, correct = mlm_sums(model.apply({"params": params}, *model_inputs(batch)), batch)
        return {"loss_sum": loss_sum, "weight_sum": weight_sum, "correct": correct}

    return fn


def eval_metrics(sums: dict) -> dict:
    count = max(float(sums["weight_sum"]), 1.0)
    return {"eval_loss": float(sums["loss_sum"]) / count, "eval_accuracy": float(sums["correct"]) / count}


def batches(cfg: Config, split: str) -> masking.MaskedBatches:
    return masking.train_batches(cfg) if split == "train" else masking.eval_batches(cfg)


MODELS.register("masked_lm", ModelFamily(
    build=build, init_inputs=init_inputs, loss_fn=loss_fn, eval_fn=eval_fn, eval_metrics=eval_metrics,
    loss_metrics=lambda loss, cfg: {}, batches=batches, batch_spec=batch_spec,
))
