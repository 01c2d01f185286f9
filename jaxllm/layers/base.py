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


# model.rope_scaling.kind: (inverse frequencies [K/2], RopeScalingConfig, RoPE base) -> (rescaled
# frequencies, the factor cos and sin are multiplied by).
ROPE_SCALINGS = Registry("model.rope_scaling.kind")
ROPE_SCALINGS.register("none", lambda inv_freq, scaling, theta: (inv_freq, 1.0))
ROPE_SCALINGS.register("linear", lambda inv_freq, scaling, theta: (inv_freq / scaling.factor, 1.0))  # positions / factor


@ROPE_SCALINGS.register("llama3")
def llama3_rope_scaling(inv_freq, scaling: RopeScalingConfig, theta: float):
    """Llama 3.1: wavelengths longer than original_max_len / low_freq_factor are stretched by
    `factor`, those shorter than original_max_len / high_freq_factor kept, and the ones between
    blended linearly in original_max_len / wavelength."""
    wavelength = 2 * math.pi / inv_freq
    ratio = scaling.original_max_len / wavelength
    blend = jnp.clip((ratio - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor), 0, 1)
    return (1 - blend) * inv_freq / scaling.factor + blend * inv_freq, 1.0


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction for a context `factor` times longer (1 at factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(scaling: RopeScalingConfig) -> float:
    """What YaRN multiplies cos and sin by (transformers' attention_factor)."""
    if scaling.attention_factor:
        return scaling.attention_factor
    if scaling.mscale and scaling.mscale_all_dim:
        return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return yarn_mscale(scaling.factor)


@ROPE_SCALINGS.register("yarn")
def yarn_rope_scaling(inv_freq, scaling: RopeScalingConfig, theta: float):
    """YaRN (as transformers' _compute_yarn_parameters): dimensions turning fewer than beta_slow
    times over original_max_len are interpolated (inv_freq / factor), those turning more than
    beta_fast times kept, a linear ramp over the dimension index between; cos and sin times
    yarn_attention_factor."""
    half = inv_freq.shape[-1]
    dim = 2 * half
    # The frequencies as transformers computes them (base^(2i/dim), then inverted), for equal bits.
    pos_freqs = theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)

    def correction_dim(rotations):
        return dim * math.log(scaling.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = jnp.clip((jnp.arange(half, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the frequency), 0: interpolate
    inv_freq = (1.0 / (scaling.factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv_freq, yarn_attention_factor(scaling)


def rotary_sin_cos(positions_BL, head_dim: int, theta: float, scaling: RopeScalingConfig = RopeScalingConfig()):
    """sin and cos [B, L, 1, K/2] of the RoPE angles, shared by every head and layer (YaRN: times
    its attention factor, which scales the scores by its square)."""
    half = head_dim // 2
    inv_freq, magnitude = ROPE_SCALINGS.get(scaling.kind)(theta ** (-jnp.arange(half, dtype=jnp.float32) / half),
                                                          scaling, theta)
    angles_BLK = positions_BL[..., None].astype(jnp.float32) * inv_freq
    sin, cos = jnp.sin(angles_BLK), jnp.cos(angles_BLK)
    if magnitude != 1.0:
        sin, cos = sin * magnitude, cos * magnitude
    return sin[:, :, None, :], cos[:, :, None, :]


def apply_rotary(x_BLNK, sin, cos):
    """Rotates channel pairs (i, i + K/2) by position-dependent angles (RoPE, rotate-half form).
    Works for any head layout between L and K (e.g. [B, L, N, G, K]) given sin/cos broadcastable
    to it."""
    x1, x2 = (h.astype(jnp.float32) for h in jnp.split(x_BLNK, 2, axis=-1))
    # Each half goes back to the input dtype before the concatenation (the same numbers): a float32
    # concatenation made XLA write a float32 copy of q and k per layer at scale.
    return jnp.concatenate([(x1 * cos - x2 * sin).astype(x_BLNK.dtype),
                            (x2 * cos + x1 * sin).astype(x_BLNK.dtype)], axis=-1)
