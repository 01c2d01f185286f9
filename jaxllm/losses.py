"""Loss functions: pure, float32, masked by per-token weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.registry import Registry


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


# ---------------------------------------------------------------------------------------------
# Distillation. Conventions: P is the teacher distribution, Q the student's, both softened by the
# same temperature T. Every loss returns a sum over weighted tokens, like `cross_entropy`.

# Logits are clipped to +-LOGIT_LIMIT so that -inf (masked vocabulary entries) and +inf become
# finite before the softmax: log_softmax of a row holding -inf is fine, but gradients through
# `inf - inf` are NaN. Clipping passes no gradient to the clipped entries, which is what a masked
# entry should get.
LOGIT_LIMIT = 1e30
# Log-probabilities are floored here wherever they are divided into (log p - log q): exp(-1000) is
# zero in float32 anyway, and the floor keeps the loss finite (and its gradient exactly zero) when
# the other distribution puts mass where this one has none, e.g. the student on a -inf logit.
LOG_PROB_FLOOR = -1000.0


def softened_log_probs(logits_BLV, temperature: float = 1.0, top_k: int = 0):
    """float32 log softmax(logits / T), optionally keeping only the `top_k` largest logits (the
    rest get probability exactly 0 and the kept ones are renormalised)."""
    logits_BLV = jnp.clip(logits_BLV.astype(jnp.float32), -LOGIT_LIMIT, LOGIT_LIMIT) / temperature
    if top_k and top_k < logits_BLV.shape[-1]:
        kth_BL1 = jax.lax.top_k(logits_BLV, top_k)[0][..., -1:]
        logits_BLV = jnp.where(logits_BLV >= kth_BL1, logits_BLV, -LOGIT_LIMIT)
    return jax.nn.log_softmax(logits_BLV, axis=-1)


def _kl_per_token(log_p_BLV, log_q_BLV):
    """KL(P || Q) per token, with 0 log 0 = 0 and no NaN in values or gradients."""
    p_BLV = jnp.exp(log_p_BLV)
    # Where p == 0 the term is 0; the safe log_p keeps the unused branch from producing 0 * -inf.
    safe_log_p = jnp.where(p_BLV > 0, log_p_BLV, 0.0)
    log_ratio = safe_log_p - jnp.maximum(log_q_BLV, LOG_PROB_FLOOR)
    return jnp.sum(jnp.where(p_BLV > 0, p_BLV * log_ratio, 0.0), axis=-1)


def generalized_jsd_per_token(log_p_BLV, log_q_BLV, beta: float):
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 2) with the
    mixture M = beta P + (1 - beta) Q:

        JSD(beta) = [beta KL(P || M) + (1 - beta) KL(Q || M)] / (beta (1 - beta)).

    GKD's unnormalised form tends to beta KL(P||Q) as beta -> 0 and to (1 - beta) KL(Q||P) as
    beta -> 1, so it only "reduces to" the KLs after dividing those factors out; we divide by
    beta (1 - beta) so that the loss is continuous in beta and equals forward KL at beta = 0 and
    reverse KL at beta = 1 exactly (at beta = 0.5 it is 4x the classic JSD)."""
    if beta <= 0.0:
        return _kl_per_token(log_p_BLV, log_q_BLV)
    if beta >= 1.0:
        return _kl_per_token(log_q_BLV, log_p_BLV)
    log_m_BLV = jnp.logaddexp(
        jnp.log(beta) + jnp.maximum(log_p_BLV, LOG_PROB_FLOOR),
        jnp.log1p(-beta) + jnp.maximum(log_q_BLV, LOG_PROB_FLOOR),
    )
    jsd = beta * _kl_per_token(log_p_BLV, log_m_BLV) + (1.0 - beta) * _kl_per_token(log_q_BLV, log_m_BLV)
    return jsd / (beta * (1.0 - beta))


def distillation_loss(
    student_logits_BLV,
    teacher_logits_BLV,
    weights_BL,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    top_k: int = 0,
):
    """Soft-target loss between student and teacher logits, summed over weighted tokens.

    kind: forward_kl = KL(P || Q) (Hinton et al. 2015), reverse_kl = KL(Q || P), jsd = the
    generalized JSD above. Both distributions are softened by `temperature` and the result is
    multiplied by T^2, which keeps the gradient's magnitude independent of T (the softened
    gradient shrinks as 1/T^2), so `alpha` blends it with the hard loss at any temperature.
    top_k > 0 keeps only the teacher's k largest logits (its remaining mass renormalised away).
    Returns (loss_sum, weight_sum)."""
    divergence = DISTILL_LOSSES.get(kind)
    log_q = softened_log_probs(student_logits_BLV, temperature)
    log_p = softened_log_probs(teacher_logits_BLV, temperature, top_k)
    per_token_BL = divergence(log_p, log_q, beta) * (temperature**2)
    weights_BL = weights_BL.astype(jnp.float32)
    # `where`, not a product: masked positions contribute exactly nothing, whatever their logits.
    return jnp.sum(jnp.where(weights_BL > 0, per_token_BL * weights_BL, 0.0)), jnp.sum(weights_BL)


# distill.loss: (teacher log-probs P, student log-probs Q, beta) -> per-token divergence.
DISTILL_LOSSES = Registry("distill.loss")
DISTILL_LOSSES.register("forward_kl", lambda log_p, log_q, beta: _kl_per_token(log_p, log_q))
DISTILL_LOSSES.register("reverse_kl", lambda log_p, log_q, beta: _kl_per_token(log_q, log_p))
DISTILL_LOSSES.register("jsd", generalized_jsd_per_token)


def top1_agreement(student_logits_BLV, teacher_logits_BLV, weights_BL):
    """Sum over weighted tokens of [argmax student == argmax teacher]."""
    match_BL = jnp.argmax(student_logits_BLV, axis=-1) == jnp.argmax(teacher_logits_BLV, axis=-1)
    return jnp.sum(jnp.where(weights_BL > 0, match_BL * weights_BL.astype(jnp.float32), 0.0))


def hidden_state_loss(student_BLD, teacher_BLD, weights_BL, kind: str = "cosine"):
    """Per-token distance between (already projected) student and teacher hidden states, summed
    over weighted tokens: cosine = 1 - cos(s, t); mse = mean over the width of (s - t)^2.
    Returns (loss_sum, weight_sum)."""
    per_token_BL = HIDDEN_LOSSES.get(kind)(student_BLD.astype(jnp.float32), teacher_BLD.astype(jnp.float32))
    weights_BL = weights_BL.astype(jnp.float32)
    return jnp.sum(jnp.where(weights_BL > 0, per_token_BL * weights_BL, 0.0)), jnp.sum(weights_BL)


def _cosine_distance(s_BLD, t_BLD):
    # Normalise with a floored norm (not a division by |s||t|): a zero vector then has cosine 0
    # and a finite gradient.
    def unit(x):
        return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-12))

    return 1.0 - jnp.sum(unit(s_BLD) * unit(t_BLD), axis=-1)


# distill.hidden_loss: (student states, teacher states) [B, L, D] -> per-token distance [B, L].
HIDDEN_LOSSES = Registry("distill.hidden_loss")
HIDDEN_LOSSES.register("cosine", _cosine_distance)
HIDDEN_LOSSES.register("mse", lambda s_BLD, t_BLD: jnp.mean(jnp.square(s_BLD - t_BLD), axis=-1))
