"""The vision-language family ("vlm"): early fusion of a ViT with a decoder, PaliGemma-style.

    image tokens = projector(vit(image))                     [B, I, D]
    logits       = decoder([image tokens; embed(text)])     with a prefix-LM mask

The image tokens and the prompt form the prefix, attended bidirectionally (attention kind
prefix_lm); the answer is causal and is the only part the loss sees. Params: "vision" (the tower),
"projector" and "language_model" (a causal LM's layout, so `init_from` a language-model run, trained
here or imported from Hugging Face, fills it). LLaVA's two stages are two opt.freeze settings:
stage 1 trains the projector only (opt.freeze=^vision/,^language_model/), stage 2 the projector
and the language model (opt.freeze=^vision/).

Batch format (images.py, layout "vlm"): images float32 [B, size, size, channels]; inputs, targets,
segment_ids, positions, prefix int32 [B, L] (text only; the model puts the I image tokens first, at
positions 0..I-1, and shifts the text's by I); weights float32 [B, L] on the answer.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxllm import images
from jaxllm.config import Config, ModelConfig, VisionConfig
from jaxllm.models.causal_lm import eval_metrics as lm_eval_metrics, eval_sums, token_bytes
from jaxllm.models.causal_lm import loss_fn as lm_loss_fn
from jaxllm.models.family import MODELS, ModelFamily
from jaxllm.models.transformer import Transformer
from jaxllm.models.vit import PROJECTORS, VisionTower


class VisionLanguageModel(nn.Module):
    cfg: ModelConfig  # the language model
    vision_cfg: VisionConfig

    def setup(self):
        self.vision = VisionTower(self.vision_cfg, self.cfg)
        self.projector = PROJECTORS.get(self.vision_cfg.projector)(self.cfg.d_model, self.cfg.dtype, self.cfg.init_std)
        self.language_model = Transformer(self.cfg)

    def embed_images(self, images):
        """Image tokens [B, I, D] in the language model's width."""
        return self.projector(self.vision(images))

    def __call__(self, images, tokens_BL, segment_ids_BL, positions_BL, prefix_BL):
        """float32 logits [B, L, V] of the text positions."""
        image_BID = self.embed_images(images)
        B, I = image_BID.shape[:2]
        segment_ids, positions = image_prefix_layout(I, segment_ids_BL, positions_BL, jnp)
        prefix = jnp.concatenate([jnp.ones((B, I), bool), prefix_BL.astype(bool)], axis=1)
        logits = self.language_model(tokens_BL, segment_ids, positions, prefix_BL=prefix, prefix_embeds_BID=image_BID)
        return logits[:, I:]


def image_prefix_layout(I: int, segment_ids_BL, positions_BL, xp=np):
    """Segment ids and positions of I image tokens followed by the text (numpy or jax.numpy as
    `xp`): the images are segment 1 at positions 0..I-1 and the text's positions move up by I. Both
    training and cached decoding lay sequences out with it, so the two cannot disagree."""
    B = segment_ids_BL.shape[0]
    segment_ids = xp.concatenate([xp.ones((B, I), xp.int32), segment_ids_BL], axis=1)
    positions = xp.concatenate([xp.broadcast_to(xp.arange(I, dtype=xp.int32), (B, I)), positions_BL + I], axis=1)
    return segment_ids, positions


def build(cfg: Config) -> VisionLanguageModel:
    return VisionLanguageModel(cfg.model, cfg.vision)


def init_inputs(cfg: Config) -> tuple:
    v, L = cfg.vision, min(cfg.train.seq_len, 8)
    text = jnp.zeros((1, L), jnp.int32)
    return jnp.zeros((1, v.image_size, v.image_size, v.channels), jnp.float32), text, text + 1, text, text


def model_inputs(batch) -> tuple:
    """The module's positional inputs in a batch of images with text."""
    return batch["images"], batch["inputs"], batch["segment_ids"], batch["positions"], batch["prefix"]


# Cross entropy on the answer tokens (the batch's weights; + z-loss, + the router losses).
loss_fn = functools.partial(lm_loss_fn, model_inputs=model_inputs)


def eval_fn(model, cfg: Config):
    """Answer-token loss sums, bytes, and whole-answer matches: an answer whose every token (EOS
    included) is the argmax given the ones before it is exactly what greedy decoding generates."""
    token_bytes_V = token_bytes(cfg)

    def fn(params, batch):
        logits = model.apply({"params": params}, *model_inputs(batch))
        sums = eval_sums(logits, batch, token_bytes_V)
        answered_B = jnp.any(batch["weights"] > 0, axis=1)
        wrong_B = jnp.any((jnp.argmax(logits, -1) != batch["targets"]) & (batch["weights"] > 0), axis=1)
        return {**sums, "answers": jnp.sum(answered_B), "exact": jnp.sum(answered_B & ~wrong_B)}

    return fn


def eval_metrics(sums: dict) -> dict:
    return {**lm_eval_metrics(sums), "eval_exact_match": float(sums["exact"] / max(sums["answers"], 1.0))}


def embed_images(cfg: Config, params, pixels):
    """The image tokens [B, I, D] of normalised images (images.normalise)."""
    return build(cfg).apply({"params": params}, pixels, method=VisionLanguageModel.embed_images)


MODELS.register("vlm", ModelFamily(
    build=build, init_inputs=init_inputs, loss_fn=loss_fn, eval_fn=eval_fn, eval_metrics=eval_metrics,
    loss_metrics=lambda loss, cfg: {}, batches=lambda cfg, split: images.batches(cfg, split, "vlm"),
    backbone="language_model", images=True,
))
