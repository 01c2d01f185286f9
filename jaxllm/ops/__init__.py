"""Backend- and dtype-specific fast paths behind a few functions: dense projections (custom VJP,
int8 kernels), attention (blocked causal, cuDNN, KV cache), feed-forward (fused gate/up, SwiGLU)
and grouped expert FFNs. Layers call these and read as plain einsums."""

from jaxllm.ops.attention import attend, cache_shape, cached_attention, computed_once, qkv, quantize_kv, update_cache, update_rows
from jaxllm.ops.projection import dense, einsum, is_quantized
from jaxllm.ops.ffn import gate_up, swiglu
from jaxllm.ops.grouped_ffn import GROUPED_FFNS, grouped_swiglu

__all__ = ["attend", "cache_shape", "cached_attention", "computed_once", "qkv", "quantize_kv", "update_cache", "update_rows", "dense", "einsum",
           "is_quantized", "gate_up", "swiglu", "GROUPED_FFNS", "grouped_swiglu"]
