"""Feed-forward layers and the registry of MLP kinds.

Every MLP kind is a module `Kind(cfg, name=...)` called as `mlp(x_BLD, valid_BL)`, where valid_BL
marks the tokens that are not padding (a layer that routes tokens must not spend capacity on
padding; others ignore it). MoE (layers/moe.py) is one more kind.

Shape legend as in layers/base.py.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm import ops
from jaxllm.config import ModelConfig
from jaxllm.layers.base import compute_dtype, constrain, dense_init, with_dropout_keys
from jaxllm.ops.projection import Adapted, unadapted, with_adapter
from jaxllm.registry import Registry
from jaxllm.sharding import ACT_EMBED, ACT_MLP, BATCH, LENGTH

MLP_KINDS = Registry("model.mlp_kind")


def _bias(module: nn.Module, name: str, size: int, axis: str):
    return module.param(name, nn.with_logical_partitioning(nn.initializers.zeros, (axis,)), (size,), jnp.float32)


def _down_projection(module, h_BLF, w_down, dtype):
    """h W_down (+ the down bias with model.mlp_bias), the output of every MLP kind."""
    out_BLD = ops.dense(h_BLF, w_down, 1, dtype)
    if module.cfg.mlp_bias:
        out_BLD = out_BLD + _bias(module, "down_bias", module.cfg.d_model, "embed").astype(dtype)
    return constrain(out_BLD, (BATCH, LENGTH, ACT_EMBED))



@MLP_KINDS.register("swiglu")
class Mlp(nn.Module):
    """Gated feed-forward: (act(x W_gate) * x W_up) W_down; SwiGLU (act = silu). Subclasses
    change `glu` (GeGLU). With model.mlp_bias each projection has a bias."""

    cfg: ModelConfig

    @staticmethod
    def glu(gate_up_BLJF):
        """act(gate) * up for gate and up stacked on axis -2."""
        return ops.swiglu(gate_up_BLJF)

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
        if cfg.mlp_bias:
            b_JF = jnp.stack([_bias(self, "gate_bias", F, "mlp"), _bias(self, "up_bias", F, "mlp")])
            gate_up_BLJF = gate_up_BLJF + b_JF.astype(dtype)
        gate_up_BLJF = constrain(gate_up_BLJF, (BATCH, LENGTH, None, ACT_MLP))
        h_BLF = constrain(self.glu(gate_up_BLJF), (BATCH, LENGTH, ACT_MLP))
        return _down_projection(self, h_BLF, w_down, dtype)


@MLP_KINDS.register("geglu")
class GegluMlp(Mlp):
    """GeGLU (Gemma): gelu(x W_gate) * x W_up, gelu in its tanh approximation."""

    @staticmethod
    def glu(gate_up_BLJF):
        return jax.nn.gelu(gate_up_BLJF[..., 0, :], approximate=True) * gate_up_BLJF[..., 1, :]


@MLP_KINDS.register("gelu")
class GeluMlp(nn.Module):
    """Ungated feed-forward: act(x W_up) W_down with the exact (erf) gelu (BERT); kind gelu_tanh
    uses its tanh approximation (GPT-2). With model.mlp_bias each projection has a bias."""

    cfg: ModelConfig
    approximate = False  # class constant, not a field

    @nn.compact
    def __call__(self, x_BLD, valid_BL=None):
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        D, F = cfg.d_model, cfg.mlp_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        w_up = self.param("up", dense_init(cfg.init_std, ("embed", "mlp")), (D, F))
        w_down = self.param("down", dense_init(out_std, ("mlp", "embed")), (F, D))
        w_up, w_down = with_dropout_keys(self, w_up, w_down)
        h_BLF = ops.dense(x_BLD, w_up, 1, dtype)
        if cfg.mlp_bias:
            h_BLF = h_BLF + _bias(self, "up_bias", F, "mlp").astype(dtype)
        h_BLF = constrain(jax.nn.gelu(h_BLF, approximate=self.approximate), (BATCH, LENGTH, ACT_MLP))
        return _down_projection(self, h_BLF, w_down, dtype)


@MLP_KINDS.register("gelu_tanh")
class GeluTanhMlp(GeluMlp):
    approximate = True
