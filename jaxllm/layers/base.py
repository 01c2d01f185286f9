"""Building blocks shared by every layer: logical-name helpers, embedding, the registry of norm
kinds (RMSNorm, Gemma's RMSNorm with scale 1 + w, LayerNorm with bias), the registry of position
kinds (RoPE, a learned absolute table) and rotary position embedding.

Shape legend (the same letters in every model file): B batch, L query length, S key length,
D model width, H query heads, N KV heads, G query heads per KV head, K head dim, F MLP width,
V vocab, E experts.

Parameters are float32 and carry logical axis names; `sharding.LOGICAL_RULES` maps those names
onto mesh axes. Matmuls run in the configured compute dtype; softmax and norms in float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig, RopeScalingConfig
from jaxllm.ops.projection import Adapted
from jaxllm.registry import Registry
from jaxllm.sharding import ACT_EMBED, BATCH, LENGTH


def compute_dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.dtype)


def constrain(x, names):
    return nn.with_logical_constraint(x, names)


def dense_init(std: float, names: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def with_dropout_keys(module: nn.Module, *kernels):
    """The kernels, each one with a low-rank adapter that has dropout (ops.projection.Adapted, see
    compression/lora.py) given its own dropout key from `module`'s 'dropout' rng. Only a training step
    passes that rng, so evaluation has no dropout."""
    if not module.has_rng("dropout"):
        return kernels
    return tuple(w.with_dropout_key(module.make_rng("dropout")) if isinstance(w, Adapted) and w.dropout_rate > 0 else w
                 for w in kernels)


class Embed(nn.Module):
    cfg: ModelConfig

    def setup(self):
        self.embedding = self.param(
            "embedding", dense_init(self.cfg.init_std, ("vocab", "embed")),
            (self.cfg.vocab_size, self.cfg.d_model), jnp.float32,
        )

    def __call__(self, tokens_BL):
        # The table keeps its width split over fsdp and is gathered whole along the vocabulary
        # (split over tensor otherwise): every device looks up all rows' tokens in its slice of
        # the width, and one all-to-all hands each device its rows at full width. That moves the
        # activations of one device's rows, where replicating the table would move all of it.
        # (A lookup into a vocab-split table would make XLA replicate the gathered activations.)
        # The lookup is in float32 so that the gradients of a frequent token add up in float32.
        table_VD = constrain(self.embedding, (None, "embed"))
        x_BLD = jnp.take(table_VD, constrain(tokens_BL, (None, None)), axis=0).astype(compute_dtype(self.cfg))
        return constrain(x_BLD, (BATCH, LENGTH, ACT_EMBED))


# model.norm_kind: a module `Kind(cfg, name=...)` over the last axis (the block's norms, the final
# norm, and the per-head q/k norms of model.qk_norm).
NORM_KINDS = Registry("model.norm_kind")


@NORM_KINDS.register("rmsnorm")
class RMSNorm(nn.Module):
    cfg: ModelConfig
    # The stored scale's initial value and what is added to it before it multiplies.
    scale_init = staticmethod(nn.initializers.ones)
    scale_offset = 0.0

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(self.scale_init, ("norm",)),
            (x.shape[-1],), jnp.float32,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x32 * (scale + self.scale_offset if self.scale_offset else scale)).astype(x.dtype)


@NORM_KINDS.register("rmsnorm_plus_one")
class RMSNormPlusOne(RMSNorm):
    """RMSNorm whose stored scale w starts at 0 and multiplies by 1 + w (Gemma): weight decay pulls
    the scale towards 1, not 0, and the stored values are the checkpoint's own."""

    scale_init = staticmethod(nn.initializers.zeros)
    scale_offset = 1.0


@NORM_KINDS.register("layernorm")
class LayerNorm(nn.Module):
    """LayerNorm with scale and bias (GPT-2, BERT): mean and variance in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],), jnp.float32,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
            (x.shape[-1],), jnp.float32,
        )
        x32 = x.astype(jnp.float32)
        centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        x32 = centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (x32 * scale + bias).astype(x.dtype)


def norm(cfg: ModelConfig, name: str) -> nn.Module:
    """The norm of `cfg.norm_kind`, named `name`."""
    return NORM_KINDS.get(cfg.norm_kind)(cfg, name=name)


@dataclasses.dataclass(frozen=True)
class PositionKind:
    """How a model knows token order (model.position_kind): `rotary` rotates each attention
    layer's q and k (RoPE); `learned` adds a learned table [model.max_positions, D] to the
    embeddings (GPT-2, BERT)."""

    rotary: bool = False
    learned: bool = False


POSITION_KINDS = Registry("model.position_kind")
POSITION_KINDS.register("rope", PositionKind(rotary=True))
POSITION_KINDS.register("learned", PositionKind(learned=True))
POSITION_KINDS.register("none", PositionKind())  # order only through the mask (or not at all)


class PositionEmbed(nn.Module):
    """The learned absolute position table of position kind "learned"; row p is added to the
    embedding of a token at position p."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, positions_BL):
        table = self.param("embedding", dense_init(self.cfg.init_std, (None, "embed")),
                           (self.cfg.max_positions, self.cfg.d_model), jnp.float32)
        table_PD = constrain(table, (None, "embed"))
        pos_BLD = jnp.take(table_PD, positions_BL, axis=0).astype(x_BLD.dtype)
        return constrain(x_BLD + pos_BLD, (BATCH, LENGTH, ACT_EMBED))


# model.rope_scaling.kind: (inverse frequencies [K/2], RopeScalingConfig) -> rescaled frequencies.
ROPE_SCALINGS = Registry("model.rope_scaling.kind")
ROPE_SCALINGS.register("none", lambda inv_freq, scaling: inv_freq)
ROPE_SCALINGS.register("linear", lambda inv_freq, scaling: inv_freq / scaling.factor)  # positions / factor


@ROPE_SCALINGS.register("llama3")
def llama3_rope_scaling(inv_freq, scaling: RopeScalingConfig):
    """Llama 3.1: wavelengths longer than original_max_len / low_freq_factor are stretched by
    `factor`, those shorter than original_max_len / high_freq_factor kept, and the ones between
    blended linearly in original_max_len / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    ratio = scaling.original_max_len / wavelength
    blend = jnp.clip((ratio - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor), 0, 1)
    return (1 - blend) * inv_freq / scaling.factor + blend * inv_freq


def rotary_sin_cos(positions_BL, head_dim: int, theta: float, scaling: RopeScalingConfig = RopeScalingConfig()):
    """sin and cos [B, L, 1, K/2] of the RoPE angles, shared by every head and layer."""
    half = head_dim // 2
    inv_freq = ROPE_SCALINGS.get(scaling.kind)(theta ** (-jnp.arange(half, dtype=jnp.float32) / half), scaling)
    angles_BLK = positions_BL[..., None].astype(jnp.float32) * inv_freq
    return jnp.sin(angles_BLK)[:, :, None, :], jnp.cos(angles_BLK)[:, :, None, :]


def apply_rotary(x_BLNK, sin, cos):
    """Rotates channel pairs (i, i + K/2) by position-dependent angles (RoPE, rotate-half form).
    Works for any head layout between L and K (e.g. [B, L, N, G, K]) given sin/cos broadcastable
    to it."""
    x1, x2 = jnp.split(x_BLNK.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BLNK.dtype)
