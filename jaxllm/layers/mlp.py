"""Feed-forward layers and the registry of MLP kinds.

Every MLP kind is a module `Kind(cfg, name=...)` called as `mlp(x_BLD, valid_BL)`, where valid_BL
marks the tokens that are not padding (a layer that routes tokens must not spend capacity on
padding; others ignore it). MoE (layers/moe.py) is one more kind.

Shape legend as in layers/base.py.
"""

from __future__ import annotations

import math

import flax.linen as nn

from jaxllm import ops
from jaxllm.config import ModelConfig
from jaxllm.layers.base import compute_dtype, constrain, dense_init
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
        gate_up_BLJF = constrain(ops.gate_up(x_BLD, w_gate, w_up, dtype), (BATCH, LENGTH, None, ACT_MLP))
        h_BLF = constrain(ops.swiglu(gate_up_BLJF), (BATCH, LENGTH, ACT_MLP))
        out_BLD = ops.dense(h_BLF, w_down, 1, dtype)
        return constrain(out_BLD, (BATCH, LENGTH, ACT_EMBED))
