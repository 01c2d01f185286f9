"""Loss functions: pure, float32, masked by per-token weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BLV, targets_BL, weights_BL, z_loss: float = 0.0):
    """Next-token cross entropy summed over weighted tokens.

    Returns (loss_sum, z_loss_sum, weight_sum). Sums rather than means so that gradient accumulation
    and data parallelism divide by the true token count once, at the end.
    The z-loss (PaLM) adds z_loss * log(Z)^2 to keep the softmax normaliser near 1.
    """
    logits_BLV = logits_BLV.astype(jnp.float32)
    weights_BL = weights_BL.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    target_logit_BL = jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
    nll_BL = log_z_BL - target_logit_BL
    z_BL = z_loss * jnp.square(log_z_BL)
    return (
        jnp.sum(nll_BL * weights_BL),
        jnp.sum(z_BL * weights_BL),
        jnp.sum(weights_BL),
    )


def mean_cross_entropy(logits_BLV, targets_BL, weights_BL):
    loss_sum, _, weight_sum = cross_entropy(logits_BLV, targets_BL, weights_BL)
    return loss_sum / jnp.maximum(weight_sum, 1.0)
