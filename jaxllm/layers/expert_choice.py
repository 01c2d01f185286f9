"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"): the
experts choose the tokens instead of the tokens choosing experts. Within each row (a GShard group)
every expert takes the C tokens with the highest router probability for it,

    C = ceil(top_k · L / E · capacity_factor)          (moe.capacity, at most L)

so every expert processes exactly C tokens (perfect balance, no auxiliary loss needed) while a
token may be taken by several experts or by none. A token's output is Σ over the experts that took
it of P[token, expert] · expert(token), with P the softmax over experts. Padding is never chosen.

Registered as the dispatch strategy "expert_choice" (model.moe.dispatch=expert_choice); it runs
through the same expert-major buffer and expert-parallel exchange as capacity dispatch. The
router's token-choice top-k still feeds the logged balance metrics; `dropped` counts the valid
tokens no expert took.

Shape legend as in layers/moe.py; C slots per expert and row.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.layers.moe import DISPATCHES, Exchange, Routing, capacity


def choose_tokens(probs_bLE, valid_bL, C: int):
    """(gate [b, E, C], token [b, E, C], taken [b, E, C]): for every row and expert the C tokens
    with the highest probability for that expert (ties to the earlier token), their
    probabilities, and whether the slot holds a valid token (a row with fewer valid tokens than C
    leaves slots empty)."""
    scores_bEL = jnp.where(valid_bL[:, None, :], jnp.swapaxes(probs_bLE, 1, 2), -jnp.inf)
    gate_bEC, token_bEC = jax.lax.top_k(scores_bEL, C)
    taken_bEC = gate_bEC > -jnp.inf
    return jnp.where(taken_bEC, gate_bEC, 0.0), token_bEC, taken_bEC


@DISPATCHES.register("expert_choice")
def expert_choice_dispatch(x_bLD, valid_bL, routing: Routing, experts, moe, exchange: Exchange):
    b, L, D = x_bLD.shape
    E = moe.num_experts
    C = min(capacity(L, moe), L)
    gate_bEC, token_bEC, taken_bEC = choose_tokens(routing.probs_TE.reshape(b, L, E), valid_bL, C)
    rows_b11 = jnp.arange(b)[:, None, None]
    chosen_bECD = x_bLD[rows_b11, token_bEC]
    buffer_EMD = jnp.swapaxes(chosen_bECD, 0, 1).reshape(E, b * C, D)  # expert-major, M = b·C
    out_bECD = jnp.swapaxes(exchange.experts_major(buffer_EMD, *experts).reshape(E, b, C, D), 0, 1)
    weighted_bECD = out_bECD.astype(jnp.float32) * gate_bEC[..., None]
    out_bLD = jnp.zeros((b, L, D), jnp.float32).at[rows_b11, token_bEC].add(weighted_bECD)
    chosen_bL = jnp.zeros((b, L), bool).at[rows_b11, token_bEC].max(taken_bEC)
    dropped = jnp.sum((valid_bL & ~chosen_bL).astype(jnp.float32))
    return out_bLD.reshape(b * L, D), dropped
