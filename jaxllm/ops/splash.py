"""Causal self-attention on TPU through jax's Pallas splash-attention kernel: blockwise (flash)
softmax that never holds the [L, S] scores, skips the blocks above the diagonal, and keeps
documents apart by segment ids instead of a dense mask.

It computes the same function as `attention.dot_product_attention(..., causal_self=True)` for the
causal mask of `layers.attention` (same document, key not after the query) at every real token.
Padding tokens (segment id 0) attend to each other only, so their outputs differ from the XLA
path's zeros; nothing real reads them and their loss weight is zero, and zeroing them cost a
full-size select per layer at scale.

Shape legend as in attention.py: B batch, L length, N KV heads, G query heads per KV head, K head
dim, H = N·G query heads.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

from jaxllm.sharding import BATCH_AXES

# The kernel's tiles: 512 (clipped to the length) is what the large TPU runs use.
BLOCK = 512
# The fused backward computes dq, dk and dv in one pass but writes dq once per kv block
# ([L / block, H, L, K] bf16: 1 GiB per row for Llama-3-8B at 8192 tokens) before summing them;
# above this size the separate dq kernel (one more pass over the blocks) is the better trade.
FUSED_BWD_MAX_BYTES = 64 * 2**20


def supported(L: int, K: int) -> bool:
    """Whether the kernel takes this length and head dim (its tiles are 128 lanes wide)."""
    return L % 128 == 0 and K % 128 == 0


@functools.lru_cache(maxsize=16)
def _kernel(H: int, L: int, K: int, interpret: bool):
    block = math.gcd(BLOCK, L)
    fused = (L // block) * H * L * K * 2 <= FUSED_BWD_MAX_BYTES
    sizes = kernels.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                               block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                               use_fused_bwd_kernel=fused,
                               **({} if fused else {"block_q_dq": block, "block_kv_dq": block}))
    mask = masks.MultiHeadMask([masks.CausalMask((L, L)) for _ in range(H)])
    return kernels.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local(q_bLNGK, k_bLNK, v_bLNK, segment_ids_bL, interpret: bool):
    b, L, N, G, K = q_bLNGK.shape
    kernel = _kernel(N * G, L, K, interpret)
    scale = jnp.asarray(1.0 / math.sqrt(K), q_bLNGK.dtype)
    # The kernel wants heads major: q [H, L, K] with query head h = n·G + g reading KV head n.
    q_bHLK = jnp.transpose(q_bLNGK * scale, (0, 2, 3, 1, 4)).reshape(b, N * G, L, K)
    k_bNLK, v_bNLK = (jnp.swapaxes(t, 1, 2) for t in (k_bLNK, v_bLNK))
    segments = kernels.SegmentIds(q=segment_ids_bL, kv=segment_ids_bL)
    out_bHLK = jax.vmap(kernel)(q_bHLK, k_bNLK, v_bNLK, segment_ids=segments)
    return jnp.transpose(out_bHLK.reshape(b, N, G, L, K), (0, 3, 1, 2, 4)).astype(q_bLNGK.dtype)


def splash_attention(q_BLNGK, k_BLNK, v_BLNK, segment_ids_BL, interpret: bool = False):
    """softmax(q·k/sqrt(K)) v under the causal same-document mask, per device under shard_map:
    sequences split over the batch axes, KV heads (with their query groups) over `tensor`.
    `interpret=True` runs the kernel's Python interpreter (how it is tested off TPU)."""
    mesh = jax.sharding.get_abstract_mesh()
    body = functools.partial(_local, interpret=interpret)
    if mesh.empty:
        return body(q_BLNGK, k_BLNK, v_BLNK, segment_ids_BL)
    batch = tuple(a for a in BATCH_AXES if a in mesh.shape) or None
    heads = "tensor" if "tensor" in mesh.shape else None
    qkv_spec = (P(batch, None, heads, None, None), P(batch, None, heads, None), P(batch, None, heads, None))
    return jax.shard_map(body, mesh=mesh, in_specs=(*qkv_spec, P(batch, None)), out_specs=qkv_spec[0],
                         check_vma=False)(q_BLNGK, k_BLNK, v_BLNK, segment_ids_BL)
