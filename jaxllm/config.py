"""Experiment configuration: frozen dataclasses and `key=value` overrides.

Every config is a frozen (hence hashable) dataclass so it can be a Linen attribute or a static jit
argument. An experiment file builds one with `dataclasses.replace`; the command line overrides leaves
with dotted paths such as `model.num_layers=2 train.steps=50 mesh.fsdp=4`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import json
import os
import re
import typing
from typing import Any, Sequence


class ConfigError(ValueError):
    """A configuration the user can fix; the message says how."""


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-experts MLPs (jaxllm/moe.py). num_experts=0 keeps every block dense."""

    num_experts: int = 0
    top_k: int = 2
    expert_dim: int = 0  # width F of each expert's SwiGLU; 0 means model.mlp_dim
    every: int = 1  # every k-th block is MoE (blocks k-1, 2k-1, ...); the others stay dense
    num_shared: int = 0  # always-on shared experts (DeepSeek style), one SwiGLU of num_shared*shared_dim
    shared_dim: int = 0  # 0 means expert_dim
    # softmax_topk: softmax over all experts, then top-k (Switch, GShard);
    # topk_softmax: top-k logits, then softmax over those k (Mixtral).
    router: str = "softmax_topk"
    renormalize: bool = True  # rescale the k weights to sum to 1 (softmax_topk only)
    jitter: float = 0.0  # multiplicative noise in [1-j, 1+j] on the MoE layer input (needs a dropout rng)
    dispatch: str = "dropless"  # capacity | dropless
    capacity_factor: float = 1.25
    # How dropless runs its grouped matmul: blocked (sorted rows padded to per-expert blocks; fast on
    # CPU), ragged_dot (jax.lax.ragged_dot; the natural choice on GPU/TPU), auto (ragged_dot on
    # GPU/TPU, blocked elsewhere).
    grouped_matmul: str = "auto"
    aux_loss_weight: float = 1e-2
    z_loss_weight: float = 1e-3


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 384  # 259 byte-level ids, padded to a multiple of 128 for fast matmuls
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 means num_heads (plain multi-head attention); fewer means GQA
    head_dim: int = 0  # 0 means d_model // num_heads
    mlp_dim: int = 704
    mlp_kind: str = "swiglu"  # key of model.MLP_KINDS
    attention_kind: str = "dot_product"  # key of layers.ATTENTION_KINDS
    # How training's causal self-attention is computed: "xla" (portable einsums and a masked
    # softmax, on every backend) or "cudnn" (cuDNN's fused flash attention; NVIDIA GPUs with
    # bfloat16/float16 compute only). Cached decoding always uses the XLA path.
    attention_impl: str = "xla"
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype; params are always float32
    scan_layers: bool = True
    remat: str = "none"  # none | full | save_dots
    init_std: float = 0.02
    moe: MoeConfig = MoeConfig()

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; one of them may be -1 (use the remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1


@dataclasses.dataclass(frozen=True)
class OptConfig:
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Regexes over parameter paths ("blocks/attn/q/kernel") exempt from weight decay.
    no_decay: tuple[str, ...] = (r"norm", r"embed", r"bias")
    grad_clip: float = 1.0  # global-norm clip; 0 disables


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32  # global batch, in sequences
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    z_loss: float = 0.0  # weight of log(Z)^2 on the LM logits
    log_every: int = 25
    eval_every: int = 250
    eval_batches: int = 8
    progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "python_stdlib": the embedded corpus (this Python's standard library source).
    # "text_files": the files matched by `text_files`, one document per file.
    # Anything else: a registered TFDS dataset name (e.g. "lm1b") prepared under `data_dir`.
    dataset: str = "python_stdlib"
    text_files: str = ""  # glob, for dataset="text_files"
    data_dir: str = ""  # "" means $JAXLLM_DATA_DIR or ~/.cache/jaxllm/tensorflow_datasets
    text_feature: str = "text"
    train_split: str = "train"
    eval_split: str = "validation"  # empty: train without evaluation
    eval_fraction: float = 0.05  # share of local files held out for validation
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 250  # steps between saves; 0 disables saving
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process start-up (see jaxllm/distributed.py). All defaults: one process, unless the
    environment is a recognised multi-process launch (SLURM srun, Open MPI, JAX_COORDINATOR_ADDRESS)."""

    coordinator_address: str = ""  # "host:port" of process 0; "" = $JAX_COORDINATOR_ADDRESS or detect
    num_processes: int = 0  # 0 = detect
    process_id: int = -1  # -1 = detect; the one field that differs between the processes
    auto: bool = False  # let JAX detect everything (TPU pod slices, SLURM, Open MPI, ...)
    initialization_timeout_s: int = 300  # fail, rather than wait forever, for missing processes
    heartbeat_timeout_s: int = 100  # a process silent this long is declared dead and the run stops


PRUNE_KINDS = ("none", "magnitude", "global", "nm")
PRUNE_SCHEDULES = ("one_shot", "gradual")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """Magnitude pruning inside the optimizer (see jaxllm/pruning.py).

    kind: none | magnitude (each tensor to `sparsity`) | global (one threshold over all prunable
    tensors) | nm (keep `n` of every `m` consecutive weights along the input dimension).
    schedule: one_shot (prune to `sparsity` at `start_step`) | gradual (Zhu & Gupta: recompute the
    masks every `every` steps from `start_step` to `start_step + num_updates * every`, the target
    rising from `initial_sparsity` to `sparsity` as a cubic)."""

    kind: str = "none"
    sparsity: float = 0.5  # final fraction of zeros in the prunable params (ignored for nm)
    n: int = 2
    m: int = 4
    schedule: str = "one_shot"
    start_step: int = 0  # t0
    every: int = 100  # Δt
    num_updates: int = 10  # n: the last mask update is at start_step + num_updates * every
    initial_sparsity: float = 0.0
    # Regexes over parameter paths ("blocks/attn/q"): attention and MLP kernels, expert and shared
    # expert kernels; never embeddings, norms or the MoE router.
    include: tuple[str, ...] = (r"(^|/)attn/(q|k|v|o)$", r"(^|/)mlp/(.+/)?(gate|up|down)$")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation from a frozen teacher (jaxllm/distill.py). Off while teacher_workdir
    is empty."""

    # A run directory holding checkpoints/ (as written by any experiment), or a checkpoints
    # directory itself; the teacher is restored from its latest step (or `teacher_step`).
    teacher_workdir: str = ""
    teacher_step: int = -1  # -1 = latest
    teacher: ModelConfig = ModelConfig()  # the teacher's architecture; vocab must match the student's
    # If > 0 and teacher_workdir has no checkpoint, first train the teacher for this many steps with
    # this config's data, optimizer and batch settings (the experiments use this); 0 = error instead.
    teacher_train_steps: int = 0
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    temperature: float = 1.0
    alpha: float = 0.5  # objective = alpha * soft loss + (1 - alpha) * hard next-token loss
    beta: float = 0.5  # jsd mixture weight of the teacher: 0 = forward KL, 1 = reverse KL
    top_k: int = 0  # keep only the teacher's k largest logits; 0 = all
    # Hidden-state distillation: "student_layer:teacher_layer" pairs of 0-based block indices
    # (the block's output), e.g. ("1:3", "3:7"); empty = off. The student's states go through a
    # learned linear projection to the teacher's width.
    hidden_layers: tuple[str, ...] = ()
    hidden_loss: str = "cosine"  # cosine | mse
    hidden_weight: float = 1.0  # objective += hidden_weight * (mean over the pairs of the per-token loss)

    @property
    def enabled(self) -> bool:
        return bool(self.teacher_workdir)

    def layer_pairs(self) -> tuple[tuple[int, int], ...]:
        pairs = []
        for item in self.hidden_layers:
            try:
                student, teacher = (int(x) for x in str(item).split(":"))
            except ValueError:
                raise ConfigError(
                    f"distill.hidden_layers entry {item!r} is not 'student_layer:teacher_layer' "
                    "(e.g. distill.hidden_layers=1:3,3:7)"
                ) from None
            pairs.append((student, teacher))
        return tuple(pairs)


@dataclasses.dataclass(frozen=True)
class Config:
    workdir: str = "runs/default"
    seed: int = 0
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    opt: OptConfig = OptConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    distill: DistillConfig = DistillConfig()
    prune: PruneConfig = PruneConfig()
    sample_prompt: str = "def "  # a sample is generated from this at the end of a run
    sample_tokens: int = 200


# ---------------------------------------------------------------------------------------------
# Overrides


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys(cfg: Any, prefix: str = "") -> list[str]:
    """All dotted leaf paths of a config, e.g. ['workdir', 'model.d_model', ...]."""
    keys = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            keys.extend(valid_keys(value, prefix + field.name + "."))
        else:
            keys.append(prefix + field.name)
    return keys


def _tuple_items(raw: str) -> list:
    """The items of a tuple-valued override: a Python tuple or list literal such as ("a", "b"),
    otherwise comma-separated text. Text that only looks like a literal (a regex such as
    (^|/)attn/q$, or "(1)", which Python reads as 1) is split on commas like any other."""
    if raw.strip().startswith(("(", "[")):
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, (tuple, list)):
            return list(value)
    return raw.split(",")


def _parse_value(raw: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    try:
        if typ is bool:
            lowered = raw.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(float(raw)) if "e" in raw.lower() else int(raw)
        if typ is float:
            return float(raw)
        if typ is str:
            return raw
        if origin is tuple:
            if raw.strip() == "":
                return ()
            (item_type, *_) = typing.get_args(typ) or (str,)
            return tuple(_parse_value(str(v), item_type, key) for v in _tuple_items(raw))
    except (ValueError, SyntaxError, OverflowError) as e:
        raise ConfigError(f"cannot parse {key}={raw!r} as {getattr(typ, '__name__', typ)}") from e
    raise ConfigError(f"{key} has unsupported type {typ}")


def _replace_path(cfg: Any, path: Sequence[str], raw: str, full_key: str) -> Any:
    name, rest = path[0], path[1:]
    types = _field_types(type(cfg))
    current = getattr(cfg, name)
    if rest:
        new = _replace_path(current, rest, raw, full_key)
    else:
        new = _parse_value(raw, types[name], full_key)
    return dataclasses.replace(cfg, **{name: new})


def override(cfg: Config, args: Sequence[str]) -> Config:
    """Applies `a.b=value` overrides; an unknown key raises ConfigError naming the closest keys."""
    keys = valid_keys(cfg)
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"expected key=value, got {arg!r} (for example train.steps=100)")
        key, raw = arg.split("=", 1)
        key = key.strip().lstrip("-")
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
            if not close:  # fall back to keys sharing the last component, e.g. "layers" ~ "num_layers"
                leaf = key.rsplit(".", 1)[-1]
                close = [k for k in keys if leaf in k.rsplit(".", 1)[-1]][:3]
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        cfg = _replace_path(cfg, key.split("."), raw, key)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, values: dict) -> Any:
    """Inverse of `to_dict`; unknown keys are errors so a stale saved config is noticed."""
    types = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in types:
            raise ConfigError(f"unknown key {name!r} for {cls.__name__}")
        typ = types[name]
        if dataclasses.is_dataclass(typ):
            value = from_dict(typ, value)
        elif typing.get_origin(typ) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def validate(cfg: Config) -> None:
    """Checks that do not need devices; mesh-dependent checks live in sharding.py."""
    m, t = cfg.model, cfg.train
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
    if m.head_size % 2:
        raise ConfigError(f"head dimension {m.head_size} must be even for rotary embeddings")
    if m.remat not in ("none", "full", "save_dots"):
        raise ConfigError(f"model.remat={m.remat!r}; choose none, full or save_dots")
    if m.vocab_size < 259:
        raise ConfigError(f"model.vocab_size={m.vocab_size} is below the 259 byte-level token ids")
    moe = m.moe
    if moe.num_experts:
        if moe.router not in ("softmax_topk", "topk_softmax"):
            raise ConfigError(f"model.moe.router={moe.router!r}; choose softmax_topk or topk_softmax")
        if moe.dispatch not in ("capacity", "dropless"):
            raise ConfigError(f"model.moe.dispatch={moe.dispatch!r}; choose capacity or dropless")
        if moe.grouped_matmul not in ("auto", "blocked", "ragged_dot", "dense"):
            raise ConfigError(
                f"model.moe.grouped_matmul={moe.grouped_matmul!r}; choose auto, blocked, ragged_dot or dense"
            )
        if not 1 <= moe.top_k <= moe.num_experts:
            raise ConfigError(
                f"model.moe.top_k={moe.top_k} must be between 1 and model.moe.num_experts={moe.num_experts}"
            )
        if moe.every < 1 or m.num_layers % moe.every:
            raise ConfigError(
                f"model.num_layers={m.num_layers} must be a multiple of model.moe.every={moe.every} (>= 1)"
            )
        if moe.capacity_factor <= 0:
            raise ConfigError(f"model.moe.capacity_factor must be positive, got {moe.capacity_factor}")
    for name in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "grad_accum", "eval_batches"):
        if getattr(t, name) <= 0:
            raise ConfigError(f"train.{name} must be positive, got {getattr(t, name)}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}"
        )
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"model.dtype={m.dtype!r}; choose float32, bfloat16 or float16")
    if m.attention_impl not in ("xla", "cudnn"):
        raise ConfigError(f"model.attention_impl={m.attention_impl!r}; choose xla or cudnn")
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


def validate_distill(cfg: Config) -> None:
    d = cfg.distill
    kinds = ("forward_kl", "reverse_kl", "jsd")
    if d.loss not in kinds:
        raise ConfigError(f"distill.loss={d.loss!r}; choose one of {', '.join(kinds)}")
    if d.hidden_loss not in ("cosine", "mse"):
        raise ConfigError(f"distill.hidden_loss={d.hidden_loss!r}; choose cosine or mse")
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
    if p.kind not in PRUNE_KINDS:
        raise ConfigError(f"{prefix}kind={p.kind!r}; choose one of {', '.join(PRUNE_KINDS)}")
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
