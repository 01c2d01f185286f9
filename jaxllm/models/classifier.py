"""The sequence-classification family: a decoder backbone (any registered attention and MLP kind,
dense or MoE) without its LM head, or an encoder's (classifier.backbone=encoder, models/masked_lm.py),
pooled over each sequence, and a linear `score` head.

    logits[b] = pool(backbone(tokens)[b]) W_score        (W_score [D, C], no bias)

With classifier.pooler the pooled vector goes through BERT's pooler, tanh(x W + b), first; with
classifier.score_bias the score head has a bias (BertForSequenceClassification).

Pooling "last" takes the last non-padding token (the causal backbone's summary of the whole text;
right or left padding alike), "mean" the mean over non-padding tokens, "first" the first
non-padding token (an encoder's [CLS]). Loss: cross entropy over
the labels; evaluation: loss, accuracy, macro-F1 and the confusion matrix.

Batch format (labelled.py): inputs, segment_ids, positions [B, L] int32 (segment 0 = padding),
labels [B] int32, weights [B] float32. The backbone's params sit under "backbone" in the same
layout as a causal LM's, so `init_from` a language-model run fills them (training/finetune.py).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import labelled
from jaxllm.config import ClassifierConfig, Config, ModelConfig
from jaxllm.layers import moe
from jaxllm.layers.base import dense_init
from jaxllm.models.causal_lm import text_inputs
from jaxllm.models.family import MODELS, ModelFamily
from jaxllm.models.masked_lm import Encoder
from jaxllm.models.transformer import AUX_COLLECTIONS, Transformer
from jaxllm.registry import Registry
from jaxllm.sharding import BATCH

# classifier.pooling: (hidden [B, L, D], segment_ids [B, L]) -> pooled [B, D].
POOLINGS = Registry("classifier.pooling")


@POOLINGS.register("last")
def last_token(hidden_BLD, segment_ids_BL):
    """The last non-padding position of each row, wherever the padding is."""
    L = segment_ids_BL.shape[1]
    last_B = jnp.argmax(jnp.where(segment_ids_BL != 0, jnp.arange(L), -1), axis=1)
    return jnp.take_along_axis(hidden_BLD, last_B[:, None, None], axis=1)[:, 0]


@POOLINGS.register("first")
def first_token(hidden_BLD, segment_ids_BL):
    """The first non-padding position of each row: an encoder's [CLS] token."""
    first_B = jnp.argmax(segment_ids_BL != 0, axis=1)
    return jnp.take_along_axis(hidden_BLD, first_B[:, None, None], axis=1)[:, 0]


# classifier.backbone: ModelConfig -> the backbone module (name "backbone") returning [B, L, D].
BACKBONES = Registry("classifier.backbone")
BACKBONES.register("decoder", lambda cfg: Transformer(cfg, lm_head=False, name="backbone"))
BACKBONES.register("encoder", lambda cfg: Encoder(cfg, mlm_head=False, name="backbone"))


@POOLINGS.register("mean")
def mean_over_tokens(hidden_BLD, segment_ids_BL):
    mask_BL1 = (segment_ids_BL != 0)[..., None].astype(jnp.float32)
    return jnp.sum(hidden_BLD.astype(jnp.float32) * mask_BL1, axis=1) / jnp.maximum(jnp.sum(mask_BL1, axis=1), 1.0)


class SequenceClassifier(nn.Module):
    model: ModelConfig
    classifier: ClassifierConfig

    @nn.compact
    def __call__(self, tokens_BL, segment_ids_BL=None, positions_BL=None, token_types_BL=None):
        """float32 class logits [B, C]. token_types: an encoder's sentence A/B ids (None: all 0)."""
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones(tokens_BL.shape, jnp.int32)
        backbone = BACKBONES.get(self.classifier.backbone)(self.model)
        types = {} if token_types_BL is None else {"token_types_BL": token_types_BL}
        hidden_BLD = backbone(tokens_BL, segment_ids_BL, positions_BL, **types)
        pooled_BD = POOLINGS.get(self.classifier.pooling)(hidden_BLD, segment_ids_BL).astype(jnp.float32)
        D, C = self.model.d_model, self.classifier.num_classes
        if self.classifier.pooler:
            pooled_BD = Pooler(self.model, name="pooler")(pooled_BD)
        w_DC = self.param("score", dense_init(self.model.init_std, ("embed", None)), (D, C), jnp.float32)
        logits_BC = pooled_BD @ w_DC
        if self.classifier.score_bias:
            logits_BC = logits_BC + self.param("score_bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (C,), jnp.float32)
        return nn.with_logical_constraint(logits_BC, (BATCH, None))


class Pooler(nn.Module):
    """BERT's pooler: tanh(x W + b) of the [CLS] token's state."""

    model: ModelConfig

    @nn.compact
    def __call__(self, x_BD):
        D = self.model.d_model
        w_DD = self.param("kernel", dense_init(self.model.init_std, ("embed", None)), (D, D), jnp.float32)
        b_D = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (D,), jnp.float32)
        return jnp.tanh(x_BD @ w_DD + b_D)


def build(cfg: Config) -> SequenceClassifier:
    return SequenceClassifier(cfg.model, cfg.classifier)


def init_inputs(cfg: Config) -> tuple:
    return (jnp.zeros((1, min(cfg.train.seq_len, 8)), jnp.int32),)


def forward(model, params, batch, model_inputs=text_inputs):
    """Class logits, the MoE backbone's router loss (0 if dense) and its metrics."""
    rngs = {"dropout": batch["rng"]} if "rng" in batch else None
    logits_BC, variables = model.apply({"params": params}, *model_inputs(batch), rngs=rngs,
                                       mutable=list(AUX_COLLECTIONS))
    router_loss, router_metrics = moe.collect(variables)
    return logits_BC, router_loss, router_metrics


def _cross_entropy(logits_BC, labels_B, weights_B):
    log_probs = jax.nn.log_softmax(logits_BC.astype(jnp.float32), axis=-1)
    nll_B = -jnp.take_along_axis(log_probs, labels_B[:, None], axis=-1)[:, 0]
    return jnp.sum(nll_B * weights_B), jnp.sum(weights_B)


def loss_fn(model, cfg: Config, model_inputs=text_inputs):
    """Cross entropy over the labels (+ the MoE router losses); `model_inputs(batch)` gives the
    module's inputs (the default: labelled text)."""

    def fn(params, batch):
        logits_BC, router_loss, router_metrics = forward(model, params, batch, model_inputs)
        loss_sum, weight_sum = _cross_entropy(logits_BC, batch["labels"], batch["weights"])
        correct = jnp.sum((jnp.argmax(logits_BC, -1) == batch["labels"]) * batch["weights"])
        extras = {"accuracy": correct}
        if router_metrics:
            extras.update({name: value * weight_sum for name, value in {"moe/loss": router_loss, **router_metrics}.items()})
        return loss_sum + router_loss * weight_sum, (loss_sum, weight_sum, extras)

    return fn


def eval_fn(model, cfg: Config, model_inputs=text_inputs):
    C = cfg.classifier.num_classes

    def fn(params, batch):
        logits_BC = model.apply({"params": params}, *model_inputs(batch))
        loss_sum, weight_sum = _cross_entropy(logits_BC, batch["labels"], batch["weights"])
        predicted_B = jnp.argmax(logits_BC, -1)
        # confusion[true, predicted], weighted (padding rows of the last batch weigh 0).
        confusion_CC = jnp.einsum("bt,bp->tp", jax.nn.one_hot(batch["labels"], C) * batch["weights"][:, None],
                                  jax.nn.one_hot(predicted_B, C))
        return {"loss_sum": loss_sum, "weight_sum": weight_sum, "confusion": confusion_CC}

    return fn


def eval_metrics(sums: dict) -> dict:
    confusion = np.asarray(sums["confusion"], np.float64)
    true_C, predicted_C, hits_C = confusion.sum(1), confusion.sum(0), np.diag(confusion)
    f1_C = np.where(true_C + predicted_C > 0, 2 * hits_C / np.maximum(true_C + predicted_C, 1e-12), 0.0)
    present = true_C > 0  # macro-F1 over the classes present in the evaluated examples
    return {
        "eval_loss": float(sums["loss_sum"] / max(sums["weight_sum"], 1.0)),
        "eval_accuracy": float(hits_C.sum() / max(confusion.sum(), 1.0)),
        "eval_macro_f1": float(f1_C[present].mean()) if present.any() else 0.0,
        "eval_confusion": confusion.astype(int).tolist(),
    }


def finalize(cfg: Config) -> Config:
    """The class names found in the data, kept with the run (python -m jaxllm.classify reads them)."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, classes=labelled.class_names(cfg)))


def batches(cfg: Config, split: str):
    return labelled.train_batches(cfg) if split == "train" else labelled.eval_batches(cfg)


MODELS.register("classifier", ModelFamily(
    build=build, init_inputs=init_inputs, loss_fn=loss_fn, eval_fn=eval_fn, eval_metrics=eval_metrics,
    loss_metrics=lambda loss, cfg: {}, batches=batches, backbone="backbone", finalize=finalize,
))
