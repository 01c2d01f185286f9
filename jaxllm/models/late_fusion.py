"""The late-fusion family ("late_fusion"): image + text -> label by concatenating what two towers
say about their own input.

    logits = [pool(decoder(text)); mean(vit(image))] W_score        (W_score [D + U, C], no bias)

The text tower is a decoder without its LM head ("backbone", a causal LM's layout, so `init_from`
a language-model run fills it), pooled as the classifier family pools (classifier.pooling); the
image tower is the ViT of models/vit.py ("vision"), averaged over its patches. Loss and metrics are
the classifier family's: cross entropy, accuracy, macro-F1, confusion matrix.

Batch format (images.py, layout "late_fusion"): images float32 [B, size, size, channels]; inputs,
segment_ids, positions int32 [B, L]; labels int32 [B]; weights float32 [B].
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax.numpy as jnp

from jaxllm import images, labelled
from jaxllm.config import ClassifierConfig, Config, ModelConfig, VisionConfig
from jaxllm.layers.base import dense_init
from jaxllm.models.classifier import POOLINGS, eval_fn as classifier_eval_fn
from jaxllm.models.classifier import eval_metrics as classifier_eval_metrics, loss_fn as classifier_loss_fn
from jaxllm.models.family import MODELS, ModelFamily
from jaxllm.models.transformer import Transformer
from jaxllm.models.vit import VisionTower
from jaxllm.sharding import BATCH


class LateFusionClassifier(nn.Module):
    cfg: ModelConfig  # the text tower
    vision_cfg: VisionConfig
    classifier_cfg: ClassifierConfig

    @nn.compact
    def __call__(self, images, tokens_BL, segment_ids_BL, positions_BL):
        """float32 class logits [B, C]."""
        text_BLD = Transformer(self.cfg, lm_head=False, name="backbone")(tokens_BL, segment_ids_BL, positions_BL)
        text_BD = POOLINGS.get(self.classifier_cfg.pooling)(text_BLD, segment_ids_BL)
        image_BU = jnp.mean(VisionTower(self.vision_cfg, self.cfg, name="vision")(images).astype(jnp.float32), axis=1)
        features = jnp.concatenate([text_BD.astype(jnp.float32), image_BU], axis=-1)
        w_score = self.param("score", dense_init(self.cfg.init_std, (None, None)),
                             (features.shape[-1], self.classifier_cfg.num_classes), jnp.float32)
        return nn.with_logical_constraint(features @ w_score, (BATCH, None))


def build(cfg: Config) -> LateFusionClassifier:
    return LateFusionClassifier(cfg.model, cfg.vision, cfg.classifier)


def init_inputs(cfg: Config) -> tuple:
    v, L = cfg.vision, min(cfg.train.seq_len, 8)
    text = jnp.zeros((1, L), jnp.int32)
    return jnp.zeros((1, v.image_size, v.image_size, v.channels), jnp.float32), text, text + 1, text


def image_text_inputs(batch) -> tuple:
    return batch["images"], batch["inputs"], batch["segment_ids"], batch["positions"]


def finalize(cfg: Config) -> Config:
    """The class names of the data, kept with the run."""
    names = labelled.check_class_count(cfg, images.image_set(cfg.data, cfg.data.train_split).names)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, classes=names))


MODELS.register("late_fusion", ModelFamily(
    build=build, init_inputs=init_inputs,
    loss_fn=functools.partial(classifier_loss_fn, model_inputs=image_text_inputs),
    eval_fn=functools.partial(classifier_eval_fn, model_inputs=image_text_inputs),
    eval_metrics=classifier_eval_metrics, loss_metrics=lambda loss, cfg: {},
    batches=lambda cfg, split: images.batches(cfg, split, "late_fusion"),
    backbone="backbone", finalize=finalize, images=True,
))
