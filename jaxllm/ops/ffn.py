"""Feed-forward fast paths: the gate and up projections as one matmul, and SwiGLU with a hand-
written backward pass."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.ops.projection import dense, map_kernels
from jaxllm.sharding import target_platform


def gate_up(x_BLD, w_gate_DF, w_up_DF, dtype):
    """[x W_gate, x W_up] stacked on axis -2 ([B, L, 2, F]), computed as one [D, 2, F] matmul:
    two narrow matmuls each re-read x and run well below the matmul peak on CPU. "mlp" stays the
    last axis, so tensor sharding splits gate and up identically."""
    w_DJF = map_kernels(lambda g, u: jnp.stack([g, u], axis=1), w_gate_DF, w_up_DF)
    return dense(x_BLD, w_DJF, 1, dtype, ("embed", None, "mlp"))


@jax.custom_vjp
def swiglu(gate_up_BLJF):
    """silu(gate) * up for gate and up stacked on axis -2 ([..., 2, F] -> [..., F]).

    Differentiated automatically, the forward pass keeps sigmoid(gate) and silu(gate) for the
    backward pass, which on CPU makes it three passes over [B, L, F] arrays instead of one. The
    hand-written VJP keeps only gate_up (the projection's output), recomputes the sigmoid in the
    backward pass and writes both gradients, stacked, in one pass."""
    return nn.silu(gate_up_BLJF[..., 0, :]) * gate_up_BLJF[..., 1, :]


def _swiglu_fwd(gate_up_BLJF):
    return swiglu(gate_up_BLJF), gate_up_BLJF


def _swiglu_bwd(gate_up_BLJF, dh_BLF):
    if target_platform() == "cpu":
        # Without the barrier XLA merges this recomputation with the forward pass's, and keeps
        # sigmoid(gate) and silu(gate) in buffers again (the forward then takes three passes).
        gate_up_BLJF = jax.lax.optimization_barrier(gate_up_BLJF)
    gate, up = gate_up_BLJF[..., 0, :], gate_up_BLJF[..., 1, :]
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    d_gate = dh_BLF * up * (sig + silu * (1 - sig))
    d_up = dh_BLF * silu
    return (jnp.stack([d_gate, d_up], axis=-2),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
