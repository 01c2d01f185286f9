"""The vision tower: a ViT (Dosovitskiy et al. 2021) built from the decoder's own blocks.

    x = conv_p(image) + posemb;  for each block: x += attn(norm(x)); x += mlp(norm(x));  out = norm(x)

The patch embedding is a stride-p convolution ([patch, patch, channels, U] kernel) giving one token per p x p
patch in raster order; attention is bidirectional (attention kind "bidirectional") and the blocks
are jaxllm's pre-norm blocks (RMSNorm, SwiGLU), scanned and rematerialised like the decoder's.
Position comes from the added embedding (learned, or fixed 2-D sine-cosine), so the blocks get
position 0 everywhere, which makes their RoPE the identity.

Shape legend as in layers/base.py, plus: I image tokens (patches), U the tower's width. Images are
[batch, size, size, channels] arrays (vision.image_size, vision.channels).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ConfigError, ModelConfig, VisionConfig
from jaxllm.layers.attention import layer_context
from jaxllm.layers.base import RMSNorm, constrain, dense_init
from jaxllm.models.transformer import block_stack
from jaxllm.registry import Registry
from jaxllm.sharding import ACT_EMBED, BATCH, LENGTH

# vision.posemb: (vision config) -> the fixed [I, U] table, or None for a learned one.
POSEMBS = Registry("vision.posemb")
POSEMBS.register("learned", lambda v: None)


@POSEMBS.register("sincos2d")
def sincos_2d(v: VisionConfig) -> np.ndarray:
    """Fixed 2-D sine-cosine embeddings (MoCo v3, big_vision): a quarter of the width each for
    sin and cos of the row and of the column."""
    side, quarter = v.image_size // v.patch_size, v.d_model // 4
    omega = 1.0 / 10_000 ** (np.arange(quarter) / quarter)
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    angles_r, angles_c = rows.reshape(-1, 1) * omega, cols.reshape(-1, 1) * omega
    return np.concatenate([np.sin(angles_r), np.cos(angles_r), np.sin(angles_c), np.cos(angles_c)], 1).astype(np.float32)


def tower_config(v: VisionConfig, text: ModelConfig) -> ModelConfig:
    """The blocks' ModelConfig: the tower's sizes, a bidirectional mask, the text model's compute
    dtype, layer scan and remat (not its recipe: the tower's blocks are pre-norm RMSNorm/SwiGLU)."""
    return dataclasses.replace(
        text.with_default_recipe(), d_model=v.d_model, num_layers=v.num_layers, num_heads=v.num_heads, num_kv_heads=0, head_dim=0,
        mlp_dim=v.mlp_dim, mlp_kind="swiglu", attention_kind="bidirectional", window=0, qkv_bias=False,
        moe=dataclasses.replace(text.moe, num_experts=0))


def check_images(images, v: VisionConfig) -> None:
    expected = (v.image_size, v.image_size, v.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ConfigError(f"images of shape {tuple(images.shape)}, the vision tower takes [batch, "
                          f"{', '.join(map(str, expected))}] (vision.image_size, vision.channels)")


class VisionTower(nn.Module):
    vision: VisionConfig
    text: ModelConfig  # compute dtype, scan and remat come from the language model's config

    @nn.compact
    def __call__(self, images):
        """Patch features [B, I, U] of normalised float images."""
        v = self.vision
        check_images(images, v)
        cfg = tower_config(v, self.text)
        dtype = jnp.dtype(cfg.dtype)
        # LeCun-normal, as big_vision's patch convolution: with model.init_std (0.02) over a fan-in of
        # a few pixels the image's content would vanish next to the position embeddings.
        w_patch = self.param("patch", nn.with_logical_partitioning(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                             (v.patch_size, v.patch_size, v.channels, v.d_model))
        b_U = self.param("patch_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (v.d_model,))
        x = jax.lax.conv_general_dilated(
            images.astype(dtype), w_patch.astype(dtype), window_strides=(v.patch_size, v.patch_size),
            padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        B = x.shape[0]
        x_BIU = x.reshape(B, -1, v.d_model) + b_U.astype(dtype)
        table = POSEMBS.get(v.posemb)(v)
        if table is None:
            table = self.param("posemb", dense_init(1 / v.d_model ** 0.5, (None, "embed")), (v.num_patches, v.d_model))
        x_BIU = constrain(x_BIU + table.astype(dtype)[None], (BATCH, LENGTH, ACT_EMBED))
        I = x_BIU.shape[1]
        segment_ids_BI = jnp.ones((B, I), jnp.int32)
        positions_BI = jnp.zeros((B, I), jnp.int32)  # RoPE off: position is in the posemb
        context = layer_context(cfg, segment_ids_BI, positions_BI, decode=False)
        x_BIU = block_stack(cfg, False, x_BIU, segment_ids_BI, positions_BI, context)
        return RMSNorm(cfg, name="final_norm")(x_BIU)


# vision.projector: the module that maps patch features [B, I, U] into the language model's width.
PROJECTORS = Registry("vision.projector")


@PROJECTORS.register("linear")
class LinearProjector(nn.Module):
    """One affine map (PaliGemma's projection)."""

    d_out: int
    dtype: str
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x_BIU):
        dtype, U = jnp.dtype(self.dtype), x_BIU.shape[-1]
        w_UD = self.param("kernel", dense_init(self.init_std, (None, "embed")), (U, self.d_out))
        b_D = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), (self.d_out,))
        out = jnp.einsum("biu,ud->bid", x_BIU.astype(dtype), w_UD.astype(dtype)) + b_D.astype(dtype)
        return constrain(out, (BATCH, LENGTH, ACT_EMBED))


@PROJECTORS.register("mlp")
class MlpProjector(nn.Module):
    """LLaVA-1.5's mlp2x_gelu: affine, GELU, affine."""

    d_out: int
    dtype: str
    init_std: float = 0.02

    @nn.compact
    def __call__(self, x_BIU):
        dtype, U, D = jnp.dtype(self.dtype), x_BIU.shape[-1], self.d_out
        zeros = nn.initializers.zeros
        w_UD = self.param("kernel_in", dense_init(self.init_std, ("embed", "mlp")), (U, D))
        b_in = self.param("bias_in", nn.with_logical_partitioning(zeros, ("mlp",)), (D,))
        w_DD = self.param("kernel_out", dense_init(self.init_std, ("mlp", "embed")), (D, D))
        b_out = self.param("bias_out", nn.with_logical_partitioning(zeros, ("embed",)), (D,))
        h_BID = jax.nn.gelu(jnp.einsum("biu,ud->bid", x_BIU.astype(dtype), w_UD.astype(dtype)) + b_in.astype(dtype))
        out = jnp.einsum("bix,xd->bid", h_BID, w_DD.astype(dtype)) + b_out.astype(dtype)
        return constrain(out, (BATCH, LENGTH, ACT_EMBED))
