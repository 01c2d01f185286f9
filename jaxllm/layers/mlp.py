"""Feed-forward layers and the registry of MLP kinds.

Every MLP kind is a module `Kind(cfg, name=...)` called as `mlp(x_BLD, valid_BL)`, where valid_BL
marks the tokens that are not padding (a layer that routes tokens must not spend capacity on
padding; others ignore it). MoE (layers/moe.py) is one more kind.

Shape legend as in layers/base.py.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from jaxllm import ops
from jaxllm.config import ModelConfig
from jaxllm.layers.base import compute_dtype, constrain, dense_init, with_dropout_keys
from jaxllm.ops.projection import Adapted, unadapted, with_adapter
from jaxllm.registry import Registry
from jaxllm.sharding import ACT_EMBED, ACT_MLP, BATCH, LENGTH

MLP_KINDS = Registry("model.mlp_kind")


@MLP_KINDS.register("swiglu")
class Mlp(nn.Module):
    """SwiGLU feed-forward: (silu(x W_gate) * x W_up) W_down."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, valid_BL=None):
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        D, F = cfg.d_model, cfg.mlp_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        w_gate = self.param("gate", dense_init(cfg.init_std, ("embed", "mlp")), (D, F))
        w_up = self.param("up", dense_init(cfg.init_std, ("embed", "mlp")), (D, F))
        w_down = self.param("down", dense_init(out_std, ("mlp", "embed")), (F, D))
        w_gate, w_up, w_down = with_dropout_keys(self, w_gate, w_up, w_down)  # LoRA; no-op for plain kernels
        gate_up_BLJF = ops.gate_up(x_BLD, unadapted(w_gate), unadapted(w_up), dtype)
        if isinstance(w_gate, Adapted) or isinstance(w_up, Adapted):  # adapters' terms on the fused output
            gate_up_BLJF = jnp.stack([with_adapter(gate_up_BLJF[..., j, :], x_BLD, w, 1, dtype)
                                      for j, w in enumerate((w_gate, w_up))], axis=-2)
        gate_up_BLJF = constrain(gate_up_BLJF, (BATCH, LENGTH, None, ACT_MLP))
        h_BLF = constrain(ops.swiglu(gate_up_BLJF), (BATCH, LENGTH, ACT_MLP))
        out_BLD = ops.dense(h_BLF, w_down, 1, dtype)
        return constrain(out_BLD, (BATCH, LENGTH, ACT_EMBED))
