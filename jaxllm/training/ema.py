"""An exponential moving average of the params, kept in the train state (`train.ema_decay`, 0
disables): after every step ema <- decay * ema + (1 - decay) * params, starting from the initial
params, so after t steps ema_t = decay^t p_0 + (1 - decay) Σ_{k=1..t} decay^(t-k) p_k.

It is sharded like the params (the same logical axes), saved in every checkpoint under "ema" and
resumed with the rest of the state (train.EmaTrainState; a run without it keeps the plain
TrainState and its checkpoint layout). When enabled, the run's evaluation uses it, and restore.py
reads it instead of the raw params (for sampling and every tool); a checkpoint without an "ema"
item (a soup or quantized copy of an EMA run, which saves the averaged weights as params) is read
as usual.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

KEY = "ema"


def enabled(decay: float) -> bool:
    return decay > 0


def init(params, decay: float) -> Any:
    """The EMA's initial value: a copy of the params (boxed ones keep their logical axes), or None."""
    return jax.tree.map(jnp.copy, params) if enabled(decay) else None


def update(ema, params, decay: float):
    if ema is None:
        return None
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params)


def eval_params(state):
    """The params a run evaluates (and saves for sampling): the EMA when there is one."""
    ema = getattr(state, "ema", None)
    return state.params if ema is None else ema
