"""Decoder-only transformer: embed -> N pre-norm blocks (optionally scanned and rematerialised)
-> final RMSNorm -> logits.

    x = embed(tokens);  for each block: x += attn(norm(x)); x += mlp(norm(x));  logits = norm(x) Eᵀ

Shape legend: B batch, L length, D model width, V vocab, I image (prefix embedding) tokens.

The blocks take their attention and MLP from the registries (`layers.ATTENTION_KINDS`,
`layers.MLP_KINDS`, MoE being one MLP kind); the config selects them by name.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.layers import MLP_KINDS
from jaxllm.layers.attention import ATTENTION_LAYERS, layer_context
from jaxllm.layers.base import Embed, RMSNorm, constrain, dense_init
from jaxllm.ops.projection import PROJECTION
from jaxllm.registry import Registry
from jaxllm.sharding import ACT_EMBED, ACT_VOCAB, BATCH, LENGTH

# Collections the MoE layers sow into: weighted router losses and per-layer routing metrics (read
# by moe.collect). Scanned stacks carry them along the layers axis like the params.
AUX_COLLECTIONS = ("losses", "metrics")

# model.remat: "none", or a policy of what the backward pass keeps instead of recomputing.
REMAT_POLICIES = Registry("model.remat")
REMAT_POLICIES.register("full", "nothing")  # save nothing: recompute the whole block
# Keep the weight matmuls' outputs, recompute the cheap elementwise work and attention. The
# projections run inside a custom VJP (ops.dense), invisible to the dot-based policy, so they are
# also saved by name.
REMAT_POLICIES.register("save_dots", jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names(PROJECTION),
))


def remat_policy(name: str):
    policy = REMAT_POLICIES.get(name)
    return None if policy == "nothing" else policy

# A scanned stack this shallow is unrolled (same stacked parameters, same maths) when nothing is
# rematerialised. The rolled loop has to stack every activation the backward pass needs into
# [layers, ...] buffers (zero-filled, written with dynamic-update-slice, read back with
# dynamic-slice), which costs ~15% of a step on CPU; unrolled, each is an ordinary buffer. Deeper
# stacks stay rolled to keep compile time flat; with remat they stay rolled because unrolling
# would let XLA merge the recomputation with the forward pass and undo the memory saving.
MAX_UNROLLED_SCAN_LAYERS = 16


def dense_prefix(cfg: ModelConfig) -> int:
    """The first blocks that stay dense in an MoE model (model.moe.first_dense); never scanned."""
    return cfg.moe.first_dense if cfg.moe.num_experts else 0


def is_moe_layer(cfg: ModelConfig, index: int) -> bool:
    """With model.moe.every = k, blocks k-1, 2k-1, ... are MoE (all of them for k = 1), counted
    after the model.moe.first_dense dense ones."""
    first = dense_prefix(cfg)
    return cfg.moe.num_experts > 0 and index >= first and (index - first + 1) % cfg.moe.every == 0


def block_mlp_kind(cfg: ModelConfig, index: int) -> str:
    """The MLP kind of block `index`: "moe" on the MoE blocks, model.mlp_kind elsewhere."""
    return "moe" if is_moe_layer(cfg, index) else cfg.mlp_kind


def group_size(cfg: ModelConfig) -> int:
    """Blocks per scanned unit: one, or one period of the dense/MoE pattern (model.moe.every)."""
    return cfg.moe.every if cfg.moe.num_experts else 1


class Block(nn.Module):
    cfg: ModelConfig
    decode: bool = False
    mlp_kind: str = "swiglu"  # key of layers.MLP_KINDS (see `block_mlp_kind`)

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, positions_BL, context=None):
        cfg = self.cfg
        mlp = MLP_KINDS.get(self.mlp_kind)
        h = RMSNorm(cfg, name="attn_norm")(x_BLD)
        attn = ATTENTION_LAYERS.get(cfg.attention_layer)(cfg, decode=self.decode, name="attn")
        x_BLD = x_BLD + attn(h, segment_ids_BL, positions_BL, context)
        h = RMSNorm(cfg, name="mlp_norm")(x_BLD)
        x_BLD = x_BLD + mlp(cfg, name="mlp")(h, segment_ids_BL != 0)
        x_BLD = constrain(x_BLD, (BATCH, LENGTH, ACT_EMBED))
        # Kept only when "intermediates" is mutable (hidden-state distillation); a no-op otherwise.
        self.sow("intermediates", "hidden", x_BLD)
        return x_BLD


class ScannedBlock(Block):
    """Block with the (carry, output) signature that nn.scan expects."""

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, positions_BL, context=None):
        return super().__call__(x_BLD, segment_ids_BL, positions_BL, context), None


class ScannedGroup(nn.Module):
    """What nn.scan repeats when dense and MoE blocks alternate (model.moe.every = k > 1): k
    consecutive blocks, the last one MoE, with params under `blocks/block_0` .. `blocks/block_{k-1}`
    (stacked over the num_layers / k groups)."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, positions_BL, context=None):
        for j in range(group_size(self.cfg)):
            x_BLD = Block(self.cfg, self.decode, mlp_kind=block_mlp_kind(self.cfg, dense_prefix(self.cfg) + j),
                          name=f"block_{j}")(
                x_BLD, segment_ids_BL, positions_BL, context
            )
        return x_BLD, None


def block_stack(cfg: ModelConfig, decode: bool, x_BLD, segment_ids_BL, positions_BL, context):
    """The num_layers blocks (scanned and rematerialised as the config says) over x. Called inside
    a module's compact method, it adds their params to that module ("blocks", or block_0 ..)."""
    first = dense_prefix(cfg) if cfg.scan_layers else 0
    groups = (cfg.num_layers - first) // group_size(cfg)
    if not cfg.scan_layers:
        block_cls, scanned_kwargs = Block, {}
    elif group_size(cfg) > 1:
        block_cls, scanned_kwargs = ScannedGroup, {}
    else:  # every scanned block alike: all dense, or all MoE
        block_cls, scanned_kwargs = ScannedBlock, {"mlp_kind": block_mlp_kind(cfg, first)}
    if cfg.remat != "none":
        block_cls = nn.remat(block_cls, policy=remat_policy(cfg.remat), prevent_cse=not cfg.scan_layers)
    # A scanned MoE model's dense first blocks (model.moe.first_dense) run unscanned before the
    # scan, named as in the unscanned model.
    prefix_cls = nn.remat(Block, policy=remat_policy(cfg.remat)) if cfg.remat != "none" else Block
    for i in range(first):
        x_BLD = prefix_cls(cfg, decode=decode, mlp_kind=cfg.mlp_kind, name=f"block_{i}")(
            x_BLD, segment_ids_BL, positions_BL, context)
    if cfg.scan_layers:
        stack = nn.scan(
            block_cls,
            variable_axes={"params": 0, "cache": 0, "intermediates": 0,
                           **{c: 0 for c in AUX_COLLECTIONS}},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
            length=groups,
            unroll=(
                groups if cfg.remat == "none" and cfg.num_layers <= MAX_UNROLLED_SCAN_LAYERS else 1
            ),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, decode=decode, name="blocks", **scanned_kwargs)
        x_BLD, _ = stack(x_BLD, segment_ids_BL, positions_BL, context)
    else:
        for i in range(cfg.num_layers):
            x_BLD = block_cls(cfg, decode=decode, mlp_kind=block_mlp_kind(cfg, i), name=f"block_{i}")(
                x_BLD, segment_ids_BL, positions_BL, context
            )
    return x_BLD


class Transformer(nn.Module):
    cfg: ModelConfig
    decode: bool = False
    lm_head: bool = True  # False: return the final hidden states [B, L, D] (a backbone for a task head)

    @nn.compact
    def __call__(self, tokens_BL, segment_ids_BL=None, positions_BL=None, return_hidden=False,
                 prefix_BL=None, prefix_embeds_BID=None):
        """Returns float32 logits [B, L, V] (and the final hidden states if `return_hidden`).

        segment_ids: document ids for packed rows (0 = padding); None means one document per row.
        positions: per-token positions, restarting per document; None means 0..L-1.
        prefix: True on the tokens of a bidirectional prefix (attention kind prefix_lm); None: none.
        prefix_embeds: [B, I, D] inputs placed before the tokens' embeddings (a vision-language
        model's image tokens); segment_ids, positions, prefix and the outputs then cover I + L.
        """
        cfg = self.cfg
        B, L = tokens_BL.shape
        if prefix_embeds_BID is not None:
            L += prefix_embeds_BID.shape[1]
        if segment_ids_BL is None:
            segment_ids_BL = jnp.ones((B, L), jnp.int32)
        if positions_BL is None:
            positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))

        embed = Embed(cfg, name="embed")
        x_BLD = embed(tokens_BL)
        if prefix_embeds_BID is not None:
            x_BLD = jnp.concatenate([prefix_embeds_BID.astype(x_BLD.dtype), x_BLD], axis=1)
        # RoPE angles and the attention mask depend only on positions and segments: once per call.
        context = layer_context(cfg, segment_ids_BL, positions_BL, self.decode, prefix_BL)

        x_BLD = block_stack(cfg, self.decode, x_BLD, segment_ids_BL, positions_BL, context)
        x_BLD = RMSNorm(cfg, name="final_norm")(x_BLD)
        if not self.lm_head:
            return x_BLD
        if cfg.tie_embeddings:
            table = embed.embedding
        else:
            table = self.param(
                "unembed", dense_init(cfg.init_std, ("embed", "vocab")),
                (cfg.d_model, cfg.vocab_size), jnp.float32,
            )
        logits_BLV = output_logits(cfg, table, x_BLD)
        return (logits_BLV, x_BLD) if return_hidden else logits_BLV


def output_logits(cfg: ModelConfig, table, x_BLD):
    """float32 logits [B, L, V] of final hidden states: against the embedding table [V, D] when
    tied, else against the unembedding [D, V]. The loss calls it chunk by chunk (see
    causal_lm.chunked_loss) with the params' own table."""
    table = table.astype(x_BLD.dtype)
    equation = "bld,vd->blv" if cfg.tie_embeddings else "bld,dv->blv"
    logits_BLV = constrain(jnp.einsum(equation, x_BLD, table), (BATCH, LENGTH, ACT_VOCAB))
    return logits_BLV.astype(jnp.float32)


def output_table(cfg: ModelConfig, params):
    """The params' output projection, as `output_logits` takes it."""
    return params["embed"]["embedding"] if cfg.tie_embeddings else params["unembed"]


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
