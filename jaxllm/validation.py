"""Config validation: every check that needs no devices, and every registered-kind field checked
against its registry (an unknown kind is a one-line error naming the registered ones). Mesh-
dependent checks live in sharding.py.
"""

from __future__ import annotations

import dataclasses
import os
import re

from jaxllm import knowledge, masking
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.compression.pruning import PRUNE_KINDS, PRUNE_SCHEDULES
from jaxllm.config import Config, ConfigError, DistillConfig, PruneConfig
from jaxllm.layers import ATTENTION_KINDS, ATTENTION_LAYERS, DISPATCHES, MLP_KINDS, ROUTERS
from jaxllm.layers.base import NORM_KINDS, POSITION_KINDS, ROPE_SCALINGS
from jaxllm.losses import DISTILL_LOSSES, HIDDEN_LOSSES
from jaxllm.models import MODELS, NORM_PLACEMENTS, REMAT_POLICIES
from jaxllm.models.classifier import BACKBONES, POOLINGS
from jaxllm.models.transformer import dense_prefix, group_size
from jaxllm.models.vit import POSEMBS, PROJECTORS
from jaxllm.ops import GROUPED_FFNS


def validate(cfg: Config) -> None:
    """Checks that do not need devices; mesh-dependent checks live in sharding.py."""
    m, t = cfg.model, cfg.train
    MODELS.check(cfg.family)
    ATTENTION_KINDS.check(m.attention_kind)
    MLP_KINDS.check(m.mlp_kind)
    REMAT_POLICIES.check(m.remat, allowed_extra=("none",))
    if m.window < 0:
        raise ConfigError(f"model.window must be >= 0 (0: unlimited), got {m.window}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"model.{name} must be positive, got {getattr(m, name)}")
    for name in ("num_kv_heads", "head_dim"):
        if getattr(m, name) < 0:
            raise ConfigError(f"model.{name} must be >= 0 (0: the default), got {getattr(m, name)}")
    for name in ("num_experts", "expert_dim", "num_shared", "shared_dim"):
        if getattr(m.moe, name) < 0:
            raise ConfigError(f"model.moe.{name} must be >= 0, got {getattr(m.moe, name)}")
    if m.d_model % m.num_heads and not m.head_dim:
        raise ConfigError(
            f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; "
            "change one of them or set model.head_dim"
        )
    if m.num_heads % m.kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.kv_heads}"
        )
    if m.head_size % 2 and POSITION_KINDS.get(m.position_kind).rotary:
        raise ConfigError(f"head dimension {m.head_size} must be even for rotary embeddings")
    tokenizer = tokenizer_lib.load(m.tokenizer)
    if m.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is below the {tokenizer.vocab_size} token ids of "
                          f"model.tokenizer={m.tokenizer}")
    if m.param_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.param_dtype={m.param_dtype!r}; choose float32 or bfloat16")
    ROPE_SCALINGS.check(m.rope_scaling.kind)
    r = m.rope_scaling
    if r.kind == "yarn" and not (r.factor > 0 and r.original_max_len > 0 and 0 < r.beta_slow < r.beta_fast):
        raise ConfigError(f"model.rope_scaling (yarn) needs factor > 0, original_max_len > 0 and 0 < beta_slow < beta_fast; "
                          f"got {r.factor}, {r.original_max_len}, {r.beta_slow}, {r.beta_fast}")
    validate_recipe(m, cfg)
    ATTENTION_LAYERS.check(m.attention_layer)
    if m.attention_layer == "mla":
        validate_mla(m.mla)
    moe = m.moe
    if moe.num_experts:
        ROUTERS.check(moe.router)
        DISPATCHES.check(moe.dispatch)
        GROUPED_FFNS.check(moe.grouped_matmul, allowed_extra=("auto",))
        if not 1 <= moe.top_k <= moe.num_experts:
            raise ConfigError(
                f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts={moe.num_experts}"
            )
        if not 0 <= moe.first_dense < m.num_layers:
            raise ConfigError(f"model.moe.first_dense={moe.first_dense} must be in 0..model.num_layers-1={m.num_layers - 1}")
        if moe.every < 1 or (m.num_layers - moe.first_dense) % moe.every:
            raise ConfigError(
                f"model.num_layers={m.num_layers} minus model.moe.first_dense={moe.first_dense} must be a "
                f"multiple of model.moe.every={moe.every} (>= 1)"
            )
        validate_deepseek_routing(moe)
        if moe.capacity_factor <= 0:
            raise ConfigError(f"model.moe.capacity_factor must be positive, got {moe.capacity_factor}")
    for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "grad_accum", "eval_batches"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}"
        )
    if t.loss_chunk < 0 or t.loss_chunk and t.seq_len % t.loss_chunk:
        raise ConfigError(f"train.loss_chunk={t.loss_chunk} must divide train.seq_len={t.seq_len} (0: no chunks)")
    if t.loss_chunk and cfg.family != "causal_lm":
        raise ConfigError(f"train.loss_chunk is for family causal_lm, not {cfg.family}; set train.loss_chunk=0")
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype={m.dtype!r}; choose float32, bfloat16 or float16")
    if m.kv_cache_dtype not in ("auto", "float32", "bfloat16", "int8"):
        raise ConfigError(f"model.kv_cache_dtype={m.kv_cache_dtype!r}; choose auto, float32, bfloat16 or int8")
    if m.attention_impl not in ("xla", "cudnn", "splash", "auto"):
        raise ConfigError(f"model.attention_impl={m.attention_impl!r}; choose xla, cudnn, splash or auto")
    if m.attention_impl == "splash" and (t.seq_len % 128 or m.head_size % 128):
        raise ConfigError(f"model.attention_impl=splash needs train.seq_len ({t.seq_len}) and the head dim "
                          f"({m.head_size}) to be multiples of 128; set model.attention_impl=auto or xla")
    if m.attention_impl == "cudnn" and m.dtype == "float32":
        raise ConfigError(
            "model.attention_impl=cudnn needs model.dtype=bfloat16 or float16 (cuDNN's fused "
            "attention has no float32 kernel); set model.dtype=bfloat16 or model.attention_impl=xla"
        )
    if cfg.checkpoint.keep < 1:
        # orbax would delete every checkpoint as soon as it is written.
        raise ConfigError(f"checkpoint.keep={cfg.checkpoint.keep} must be at least 1 "
                          "(checkpoint.every=0 turns checkpointing off)")
    validate_prune(cfg.prune)
    validate_distill(cfg)
    knowledge.validate(cfg.data)  # data.transform and its kg_* options
    if not 0.0 <= t.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must be in [0, 1) (0 disables the EMA)")
    if MODELS.get(cfg.family).images:
        validate_vision(cfg)
    validate_encoder(cfg)


def validate_recipe(m, cfg: Config) -> None:
    """The block's recipe fields (norms, positions, attention pattern, scales and soft-caps)."""
    NORM_KINDS.check(m.norm_kind)
    NORM_PLACEMENTS.check(m.norm_placement)
    POSITION_KINDS.check(m.position_kind)
    if POSITION_KINDS.get(m.position_kind).learned and m.max_positions <= 0:
        raise ConfigError(f"model.position_kind={m.position_kind} needs model.max_positions > 0 (rows of the table)")
    if POSITION_KINDS.get(m.position_kind).learned and cfg.train.seq_len > m.max_positions:
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_positions={m.max_positions}")
    for kind in m.attention_pattern:
        try:
            ATTENTION_KINDS.check(kind)
        except ConfigError as e:
            raise ConfigError(str(e).replace(ATTENTION_KINDS.key, "model.attention_pattern", 1)) from None
    if m.rope_thetas and len(m.rope_thetas) != len(m.attention_pattern):
        raise ConfigError(f"model.rope_thetas has {len(m.rope_thetas)} entries; give one per entry of "
                          f"model.attention_pattern ({len(m.attention_pattern)}), 0 for model.rope_theta")
    if any(t < 0 for t in m.rope_thetas):
        raise ConfigError(f"model.rope_thetas={m.rope_thetas} must be >= 0 (0: model.rope_theta)")
    if m.scan_layers and (m.num_layers - dense_prefix(m)) % group_size(m):
        raise ConfigError(
            f"model.num_layers={m.num_layers} is not a multiple of the blocks' period {group_size(m)} "
            "(model.attention_pattern, model.moe.every), which the scan repeats; set model.scan_layers=false")
    for name in ("query_scale", "attn_logit_softcap", "final_logit_softcap"):
        if getattr(m, name) < 0:
            raise ConfigError(f"model.{name} must be >= 0 (0: off), got {getattr(m, name)}")
    if m.embed_scale <= 0:
        raise ConfigError(f"model.embed_scale must be positive, got {m.embed_scale}")
    if m.attention_impl in ("cudnn", "splash") and (m.query_scale or m.attn_logit_softcap):
        raise ConfigError(f"model.attention_impl={m.attention_impl} takes neither model.query_scale nor "
                          "model.attn_logit_softcap; set model.attention_impl=auto or xla")


def validate_mla(mla) -> None:
    for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        if getattr(mla, name) <= 0:
            raise ConfigError(f"model.mla.{name} must be positive, got {getattr(mla, name)}")
    if mla.q_lora_rank < 0:
        raise ConfigError(f"model.mla.q_lora_rank must be >= 0 (0: no query compression), got {mla.q_lora_rank}")
    if mla.qk_rope_head_dim % 2:
        raise ConfigError(f"model.mla.qk_rope_head_dim={mla.qk_rope_head_dim} must be even for rotary embeddings")


def validate_deepseek_routing(moe) -> None:
    """The router bias, routed scale and group-limited top-k (model.moe.*)."""
    if moe.bias_update_rate < 0 or moe.bias_update_rate and not moe.router_bias:
        raise ConfigError(f"model.moe.bias_update_rate={moe.bias_update_rate} needs model.moe.router_bias=true "
                          "and must be >= 0")
    if moe.routed_scale <= 0:
        raise ConfigError(f"model.moe.routed_scale must be positive, got {moe.routed_scale}")
    if moe.num_groups < 1 or moe.num_experts % moe.num_groups:
        raise ConfigError(f"model.moe.num_groups={moe.num_groups} must divide model.moe.num_experts={moe.num_experts}")
    if not 1 <= moe.topk_groups <= moe.num_groups:
        raise ConfigError(f"model.moe.topk_groups={moe.topk_groups} must be in 1..model.moe.num_groups={moe.num_groups}")
    if moe.num_groups > 1 and moe.top_k > moe.topk_groups * (moe.num_experts // moe.num_groups):
        raise ConfigError(f"model.moe.top_k={moe.top_k} exceeds the experts of model.moe.topk_groups={moe.topk_groups} "
                          f"groups of {moe.num_experts // moe.num_groups}")


def validate_vision(cfg: Config) -> None:
    v = cfg.vision
    POSEMBS.check(v.posemb)
    PROJECTORS.check(v.projector)
    for name in ("image_size", "patch_size", "channels", "d_model", "num_layers", "num_heads", "mlp_dim"):
        if getattr(v, name) <= 0:
            raise ConfigError(f"vision.{name} must be positive, got {getattr(v, name)}")
    if v.image_size % v.patch_size:
        raise ConfigError(f"vision.image_size={v.image_size} is not divisible by vision.patch_size={v.patch_size}")
    if v.d_model % v.num_heads or (v.d_model // v.num_heads) % 2:
        raise ConfigError(f"vision.d_model={v.d_model} must be an even multiple of vision.num_heads={v.num_heads}")
    if v.posemb == "sincos2d" and v.d_model % 4:
        raise ConfigError(f"vision.posemb=sincos2d needs vision.d_model divisible by 4, got {v.d_model}")
    for name in ("mean", "std"):
        if len(getattr(v, name)) not in (1, v.channels):
            raise ConfigError(f"vision.{name} has {len(getattr(v, name))} values; give 1 or vision.channels={v.channels}")
    if any(s <= 0 for s in v.std):
        raise ConfigError(f"vision.std={v.std} must be positive")


def validate_distill(cfg: Config) -> None:
    d = cfg.distill
    DISTILL_LOSSES.check(d.loss)
    HIDDEN_LOSSES.check(d.hidden_loss)
    if not d.temperature > 0:
        raise ConfigError(f"distill.temperature must be positive, got {d.temperature}")
    if not 0.0 <= d.alpha <= 1.0:
        raise ConfigError(f"distill.alpha must be in [0, 1], got {d.alpha}")
    if not 0.0 <= d.beta <= 1.0:
        raise ConfigError(f"distill.beta must be in [0, 1], got {d.beta}")
    if d.top_k < 0:
        raise ConfigError(f"distill.top_k must be >= 0 (0 keeps all logits), got {d.top_k}")
    if d.hidden_weight < 0:
        raise ConfigError(f"distill.hidden_weight must be >= 0, got {d.hidden_weight}")
    reverse_like = d.loss == "reverse_kl" or (d.loss == "jsd" and d.beta == 1.0)
    if d.top_k and reverse_like:
        raise ConfigError(
            "distill.top_k with a reverse KL is degenerate: the teacher has zero probability "
            "outside its top k, so any student mass there costs the (floored) infinite log ratio; "
            "use distill.loss=forward_kl, or jsd with distill.beta < 1, or distill.top_k=0"
        )
    if not d.enabled:
        return
    # Sharing a directory, the student would resume from the teacher's checkpoints (or fail on
    # its config) and its keep-last-K clean-up would delete them.
    teacher_dir = os.path.realpath(d.teacher_workdir)
    if teacher_dir in (os.path.realpath(cfg.workdir), os.path.realpath(os.path.join(cfg.workdir, "checkpoints"))):
        raise ConfigError(
            f"distill.teacher_workdir={d.teacher_workdir} is the student's own workdir "
            f"({cfg.workdir}); give the student (workdir=...) or the teacher a directory of its own"
        )
    try:  # the teacher's architecture must be valid on its own
        validate(dataclasses.replace(cfg, model=d.teacher, distill=DistillConfig()))
    except ConfigError as e:
        raise ConfigError(f"distill.teacher: {e}") from None
    if d.teacher.tokenizer != cfg.model.tokenizer:
        raise ConfigError(
            f"distill.teacher.tokenizer={d.teacher.tokenizer} differs from model.tokenizer={cfg.model.tokenizer}: "
            "teacher and student must share a tokenizer")
    if d.teacher.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"distill.teacher.vocab_size={d.teacher.vocab_size} differs from "
            f"model.vocab_size={cfg.model.vocab_size}: teacher and student must share a vocabulary"
        )
    for student, teacher in d.layer_pairs():
        if not 0 <= student < cfg.model.num_layers:
            raise ConfigError(
                f"distill.hidden_layers: student layer {student} is outside 0..{cfg.model.num_layers - 1}"
            )
        if not 0 <= teacher < d.teacher.num_layers:
            raise ConfigError(
                f"distill.hidden_layers: teacher layer {teacher} is outside 0..{d.teacher.num_layers - 1}"
            )
    if d.top_k > cfg.model.vocab_size:
        raise ConfigError(f"distill.top_k={d.top_k} exceeds the vocabulary ({cfg.model.vocab_size})")


def validate_prune(p: PruneConfig, prefix: str = "prune.") -> None:
    if p.kind != "none" and p.kind not in PRUNE_KINDS:
        raise ConfigError(f"{prefix}kind={p.kind!r}; choose one of none, {', '.join(PRUNE_KINDS)}")
    if p.schedule not in PRUNE_SCHEDULES:
        raise ConfigError(f"{prefix}schedule={p.schedule!r}; choose one of {', '.join(PRUNE_SCHEDULES)}")
    if p.kind == "none":
        return
    if p.kind == "nm":
        if not 0 < p.n < p.m:
            raise ConfigError(f"{prefix}n={p.n}, {prefix}m={p.m}: need 0 < n < m (for example n=2 m=4)")
        if p.schedule != "one_shot":
            raise ConfigError(
                f"{prefix}kind=nm has a fixed sparsity of 1 - n/m; use {prefix}schedule=one_shot"
            )
    if not 0.0 <= p.sparsity < 1.0:
        raise ConfigError(f"{prefix}sparsity={p.sparsity} must be in [0, 1)")
    if not 0.0 <= p.initial_sparsity <= p.sparsity:
        raise ConfigError(
            f"{prefix}initial_sparsity={p.initial_sparsity} must be in [0, {prefix}sparsity={p.sparsity}]"
        )
    if p.start_step < 0:
        raise ConfigError(f"{prefix}start_step={p.start_step} must be >= 0")
    if p.schedule == "gradual" and (p.every <= 0 or p.num_updates <= 0):
        raise ConfigError(
            f"{prefix}every={p.every} and {prefix}num_updates={p.num_updates} must be positive "
            "for the gradual schedule"
        )
    if not p.include:
        raise ConfigError(f"{prefix}include is empty: give regexes of the parameter paths to prune")
    for pattern in p.include:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"{prefix}include has an invalid regex {pattern!r}: {e}") from e


def validate_encoder(cfg: Config) -> None:
    """Masked-LM and encoder-classifier settings."""
    if cfg.model.type_vocab_size < 0:
        raise ConfigError(f"model.type_vocab_size must be >= 0 (0: no token types), got {cfg.model.type_vocab_size}")
    if cfg.family == "masked_lm":
        masking.check(cfg.mlm)
    if cfg.family == "classifier":
        BACKBONES.check(cfg.classifier.backbone)
        POOLINGS.check(cfg.classifier.pooling)
