"""Decoder-only transformer: embed -> N blocks (optionally scanned and rematerialised) -> final
norm -> logits.

    x = embed(tokens);  for each block: x += attn(norm(x)); x += mlp(norm(x));  logits = norm(x) Eᵀ

Shape legend: B batch, L length, D model width, V vocab, I image (prefix embedding) tokens.

The blocks take every part of their recipe from the registries and the config, selected by name:
attention kind (`layers.ATTENTION_KINDS`, per block with model.attention_pattern), MLP kind
(`layers.MLP_KINDS`, MoE being one), norm kind (`layers.base.NORM_KINDS`), where the norms sit
(`NORM_PLACEMENTS`: pre, sandwich, post) and the position kind (`layers.base.POSITION_KINDS`);
embedding scale and logit soft-cap are config fields.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.layers import MLP_KINDS
from jaxllm.layers.attention import ATTENTION_LAYERS, layer_config, layer_contexts, pattern_period
from jaxllm.layers.base import POSITION_KINDS, Embed, PositionEmbed, constrain, dense_init, norm
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


@dataclasses.dataclass(frozen=True)
class NormPlacement:
    """Where a block's norms sit around a sublayer f (attention or MLP) named `name`; the norms
    are named `{name}_norm` (and `post_{name}_norm`). `final_norm`: whether the stack ends with one
    more norm (a post-norm block already ends with one)."""

    residual: Callable  # (x, f, make_norm(name) -> module, name) -> x
    final_norm: bool = True


NORM_PLACEMENTS = Registry("model.norm_placement")
NORM_PLACEMENTS.register("pre", NormPlacement(lambda x, f, make, name: x + f(make(f"{name}_norm")(x))))
NORM_PLACEMENTS.register("sandwich", NormPlacement(  # Gemma 2/3: the sublayer's output is normed too
    lambda x, f, make, name: x + make(f"post_{name}_norm")(f(make(f"{name}_norm")(x)))))
NORM_PLACEMENTS.register("post", NormPlacement(  # the original Transformer, BERT
    lambda x, f, make, name: make(f"{name}_norm")(x + f(x)), final_norm=False))


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
    """Blocks per scanned unit: one, or one period of the blocks' pattern: dense/MoE
    (model.moe.every) and attention kinds (model.attention_pattern)."""
    return math.lcm(cfg.moe.every if cfg.moe.num_experts else 1, pattern_period(cfg))


class Block(nn.Module):
    cfg: ModelConfig
    decode: bool = False
    mlp_kind: str = "swiglu"  # key of layers.MLP_KINDS (see `block_mlp_kind`)

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, positions_BL, context=None):
        cfg = self.cfg
        mlp = MLP_KINDS.get(self.mlp_kind)
        residual = NORM_PLACEMENTS.get(cfg.norm_placement).residual
        make_norm = lambda name: norm(cfg, name)  # noqa: E731
        attn = ATTENTION_LAYERS.get(cfg.attention_layer)(cfg, decode=self.decode, name="attn")
        x_BLD = residual(x_BLD, lambda h: attn(h, segment_ids_BL, positions_BL, context), make_norm, "attn")
        x_BLD = residual(x_BLD, lambda h: mlp(cfg, name="mlp")(h, segment_ids_BL != 0), make_norm, "mlp")
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
    """What nn.scan repeats when blocks differ by a pattern (dense and MoE blocks alternating with
    model.moe.every = k > 1, attention kinds with model.attention_pattern): one period of k
    consecutive blocks, with params under `blocks/block_0` .. `blocks/block_{k-1}` (stacked over
    the num_layers / k groups). `contexts` holds one LayerContext per attention-pattern entry."""

    cfg: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BLD, segment_ids_BL, positions_BL, contexts=(None,)):
        for j in range(group_size(self.cfg)):
            i = dense_prefix(self.cfg) + j  # the block's index in the whole stack
            x_BLD = Block(layer_config(self.cfg, i), self.decode, mlp_kind=block_mlp_kind(self.cfg, i),
                          name=f"block_{j}")(x_BLD, segment_ids_BL, positions_BL, contexts[i % len(contexts)])
        return x_BLD, None


def block_stack(cfg: ModelConfig, decode: bool, x_BLD, segment_ids_BL, positions_BL, context):
    """The num_layers blocks (scanned and rematerialised as the config says) over x. Called inside
    a module's compact method, it adds their params to that module ("blocks", or block_0 ..).
    `context`: a LayerContext, or one per attention-pattern entry (`layer_contexts`)."""
    contexts = tuple(context) if isinstance(context, (tuple, list)) else (context,)
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
        x_BLD = prefix_cls(layer_config(cfg, i), decode=decode, mlp_kind=cfg.mlp_kind, name=f"block_{i}")(
            x_BLD, segment_ids_BL, positions_BL, contexts[i % len(contexts)])
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
        )(cfg if group_size(cfg) > 1 else layer_config(cfg, first), decode=decode, name="blocks", **scanned_kwargs)
        x_BLD, _ = stack(x_BLD, segment_ids_BL, positions_BL,
                         contexts if group_size(cfg) > 1 else contexts[first % len(contexts)])
    else:
        for i in range(cfg.num_layers):
            x_BLD = block_cls(layer_config(cfg, i), decode=decode, mlp_kind=block_mlp_kind(cfg, i), name=f"block_{i}")(
                x_BLD, segment_ids_BL, positions_BL, contexts[i % len(contexts)]
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
        if cfg.embed_scale != 1.0:  # the tokens' embeddings only, not a prefix's (PaliGemma)
            x_BLD = x_BLD * jnp.asarray(cfg.embed_scale, x_BLD.dtype)
        if prefix_embeds_BID is not None:
            x_BLD = jnp.concatenate([prefix_embeds_BID.astype(x_BLD.dtype), x_BLD], axis=1)
        if POSITION_KINDS.get(cfg.position_kind).learned:
            x_BLD = PositionEmbed(cfg, name="position_embed")(x_BLD, positions_BL)
        if cfg.embed_norm:
            x_BLD = norm(cfg, "embed_norm")(x_BLD)
        # RoPE angles and the attention masks depend only on positions and segments: once per call
        # (per entry of the attention pattern).
        contexts = layer_contexts(cfg, segment_ids_BL, positions_BL, self.decode, prefix_BL)

        x_BLD = block_stack(cfg, self.decode, x_BLD, segment_ids_BL, positions_BL, contexts)
        if NORM_PLACEMENTS.get(cfg.norm_placement).final_norm:
            x_BLD = norm(cfg, "final_norm")(x_BLD)
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
    logits_BLV = constrain(jnp.einsum(equation, x_BLD, table), (BATCH, LENGTH, ACT_VOCAB)).astype(jnp.float32)
    if cfg.final_logit_softcap:
        logits_BLV = cfg.final_logit_softcap * jnp.tanh(logits_BLV / cfg.final_logit_softcap)
    return logits_BLV


def output_table(cfg: ModelConfig, params):
    """The params' output projection, as `output_logits` takes it."""
    return params["embed"]["embedding"] if cfg.tie_embeddings else params["unembed"]


def count_params(params) -> int:
    return sum(x.size for x in jax.tree.leaves(params))
