"""Model FLOPs (PaLM appendix B) and the peak FLOP/s they are compared against for MFU."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig

# Rated dense bf16 peak per chip, FLOP/s. CPU has no rated figure: it is measured instead.
RATED_PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
}


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul for every token (for MoE: the active ones, the router,
    top_k experts and the shared experts): the blocks' kernels plus the output projection (the
    input embedding is a gather, not a matmul)."""
    D, H, N, K, F = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.mlp_dim
    attention = D * H * K * 2 + D * N * K * 2
    if cfg.attention_layer == "mla":  # the expanded projections training runs (layers/mla.py)
        m = cfg.mla
        q = (D * m.q_lora_rank + m.q_lora_rank * H * (m.qk_nope_head_dim + m.qk_rope_head_dim) if m.q_lora_rank
             else D * H * (m.qk_nope_head_dim + m.qk_rope_head_dim))
        kv = D * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim)
        attention = q + kv + H * m.v_head_dim * D
    dense_mlp = 3 * D * F
    moe = cfg.moe
    moe_layers = (cfg.num_layers - moe.first_dense) // moe.every if moe.num_experts else 0
    expert_F = moe.expert_dim or F
    moe_mlp = D * moe.num_experts + 3 * D * expert_F * moe.top_k
    moe_mlp += 3 * D * moe.num_shared * (moe.shared_dim or expert_F)
    return (cfg.num_layers * attention + (cfg.num_layers - moe_layers) * dense_mlp
            + moe_layers * moe_mlp + D * cfg.vocab_size)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weight matmuls (forward + backward) plus 12·layers·H·K·L
    for the attention scores and values, as in PaLM's MFU definition."""
    return 6 * matmul_params(cfg) + 12 * cfg.num_layers * cfg.num_heads * cfg.head_size * seq_len


def rated_peak_flops(device=None) -> float | None:
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, flops in RATED_PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return flops
    return None


# Square float32 matmuls whose best rate stands for the CPU's peak; 4096 is included because on
# some hosts the largest size is the only one that keeps every core's FMA units busy.
SQUARE_MATMUL_SIZES = (1024, 2048, 4096)


def largest_matmul_shape(cfg: ModelConfig, tokens: int) -> tuple[int, int, int]:
    """(m, k, n) of the biggest weight matmul one forward pass over `tokens` tokens runs, counting
    the fused projections (q/k/v together, gate/up together) as the single matmul they are."""
    D, H, N, K, F, V = (
        cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_size, cfg.mlp_dim, cfg.vocab_size
    )
    shapes = [(tokens, D, (H + 2 * N) * K), (tokens, H * K, D), (tokens, D, 2 * F), (tokens, F, D),
              (tokens, D, V)]
    return max(shapes, key=lambda s: (s[0] * s[1] * s[2], s))


def measure_matmul_flops(shapes=None, repeats=5, dtype=jnp.float32, per_shape=False):
    """Best FLOP/s over matmuls of the given (m, k, n) shapes on the default device (default: the
    SQUARE_MATMUL_SIZES cubes), each the fastest of `repeats` timed runs after a warm-up run.

    With `per_shape` returns {shape: best FLOP/s} instead, so a caller can say which shape set the
    peak."""
    if shapes is None:
        shapes = tuple((n, n, n) for n in SQUARE_MATMUL_SIZES)
    matmul = jax.jit(jnp.matmul)
    rates = {}
    for m, k, n in shapes:
        a = jnp.asarray(np.random.default_rng(0).standard_normal((m, k)), dtype)
        b = jnp.asarray(np.random.default_rng(1).standard_normal((k, n)), dtype)
        matmul(a, b).block_until_ready()
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            matmul(a, b).block_until_ready()
            best = max(best, 2 * m * k * n / (time.perf_counter() - start))
        rates[(m, k, n)] = max(best, rates.get((m, k, n), 0.0))
    return rates if per_shape else max(rates.values())


def peak_flops_per_device() -> float:
    """Rated peak on accelerators; on CPU the measured float32 matmul rate (all of the host's cores
    serve every fake device, so the figure is per host)."""
    return rated_peak_flops() or measure_matmul_flops()
