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
    # DeepSeek-V3 routing (layers/moe.py). router="sigmoid": sigmoid affinities, the k weights
    # taken from them (renormalised if `renormalize`). router_bias: a per-expert bias added to the
    # scores for choosing the experts only, moved by the train step towards balanced load by
    # bias_update_rate · sign(mean load - load) per step (aux-loss-free balancing); no gradient.
    router_bias: bool = False
    bias_update_rate: float = 0.0
    routed_scale: float = 1.0  # the routed experts' weights times this (DeepSeek-V3: 2.5)
    # Group-limited top-k: experts in num_groups equal groups, a token's k experts chosen inside
    # the topk_groups groups with the highest sum of their top-2 scores (DeepSeek-V3: 8, 4).
    num_groups: int = 1
    topk_groups: int = 1
    first_dense: int = 0  # the first blocks stay dense (DeepSeek-V3: 3); the MoE pattern starts after them


@dataclasses.dataclass(frozen=True)
class MlaConfig:
    """Multi-head latent attention (model.attention_layer=mla, layers/mla.py; DeepSeek-V2/V3): keys
    and values come up from one kv_lora_rank latent per token, plus one qk_rope_head_dim RoPE key
    shared by all heads; the cache holds just those two."""

    q_lora_rank: int = 0  # rank of the queries' low-rank projection; 0: projected from x directly
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32  # the part of each query/key head without RoPE
    qk_rope_head_dim: int = 16  # the RoPE part (one key head shared across heads)
    v_head_dim: int = 32


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
    """Rescaling of the RoPE frequencies for long contexts (key of layers.base.ROPE_SCALINGS):
    "none", "linear" (every frequency divided by `factor`) or "llama3" (Llama 3.1: low frequencies
    divided by `factor`, a smooth blend between `low_freq_factor` and `high_freq_factor`
    wavelengths of the original context) or "yarn" (fields below)."""

    kind: str = "none"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_len: int = 8192
    # "yarn" (YaRN; DeepSeek-V3, Kimi): frequencies ramped from interpolated (/ factor) to kept
    # between beta_slow and beta_fast rotations over original_max_len; cos/sin times
    # attention_factor (0: mscale(factor, mscale) / mscale(factor, mscale_all_dim), transformers').
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float = 0.0
    truncate: bool = True  # the ramp's ends rounded outwards to whole dimensions


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 384  # 259 byte-level ids, padded to a multiple of 128 for fast matmuls
    # "bytes" (ids 0-255 are bytes, then BOS, EOS, PAD) or the path of a Hugging Face tokenizer.json
    # (or of a directory holding one); see jaxllm/tokenizer.py.
    tokenizer: str = "bytes"
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 means num_heads (plain multi-head attention); fewer means GQA
    head_dim: int = 0  # 0 means d_model // num_heads
    mlp_dim: int = 704
    mlp_kind: str = "swiglu"  # key of layers.MLP_KINDS (MoE blocks are "moe", see moe.every)
    attention_kind: str = "causal"  # key of layers.ATTENTION_KINDS: causal, bidirectional, prefix_lm, ...
    window: int = 0  # keys a query sees at most, for windowed attention kinds (0: unlimited)
    # How training's causal self-attention is computed: "xla" (portable einsums and a masked
    # softmax, on every backend), "cudnn" (cuDNN's fused flash attention; NVIDIA GPUs with
    # bfloat16/float16 compute only), "splash" (jax's Pallas splash kernel; TPUs, lengths and head
    # dims multiples of 128) or "auto" (the mesh platform's fused kernel where it applies, else
    # xla). Cached decoding always uses the XLA path.
    attention_impl: str = "xla"
    rope_theta: float = 10_000.0
    rope_scaling: RopeScalingConfig = RopeScalingConfig()
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    type_vocab_size: int = 0  # token-type (sentence A/B) embeddings added to the tokens' (BERT); 0: none
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    dtype: str = "float32"  # compute dtype
    # dtype params are restored (and imported) in: float32 for training; bfloat16 halves the memory
    # of an imported model for inference, evaluation and quantization. Training inits float32.
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"  # none | full | save_dots
    init_std: float = 0.02
    moe: MoeConfig = MoeConfig()
    # The block's recipe; the defaults are Llama's (pre-norm RMSNorm, RoPE, SwiGLU).
    norm_kind: str = "rmsnorm"  # key of layers.NORM_KINDS: rmsnorm | rmsnorm_plus_one (Gemma) | layernorm
    # key of models.NORM_PLACEMENTS: pre (x + f(norm(x))) | sandwich (x + norm(f(norm(x))), Gemma 2/3)
    # | post (norm(x + f(x)), BERT; no final norm)
    norm_placement: str = "pre"
    qk_norm: bool = False  # a norm (norm_kind) over each head's q and k before RoPE (Qwen3, Gemma 3)
    attn_out_bias: bool = False  # a bias on the attention output projection (GPT-2, BERT)
    mlp_bias: bool = False  # biases on the MLP's projections (GPT-2, BERT)
    position_kind: str = "rope"  # key of layers.POSITION_KINDS: rope | learned (GPT-2, BERT) | none
    max_positions: int = 0  # rows of the learned position table (position_kind=learned)
    # Attention kind of block i: attention_pattern[i % len], e.g. 5 x sliding_window then causal
    # (Gemma 3); empty: attention_kind in every block. rope_thetas: the RoPE base of each entry
    # (0: rope_theta); rope_scaling applies to the entries that use rope_theta.
    attention_pattern: tuple[str, ...] = ()
    rope_thetas: tuple[float, ...] = ()
    query_scale: float = 0.0  # scores are q·k times this; 0: 1/sqrt(head dim) (Gemma: query_pre_attn_scalar^-1/2)
    attn_logit_softcap: float = 0.0  # scores -> c·tanh(scores / c) before the mask (Gemma 2); 0: off
    embed_scale: float = 1.0  # token embeddings times this (Gemma: sqrt(d_model))
    embed_norm: bool = False  # a norm right after the embeddings (BERT)
    final_logit_softcap: float = 0.0  # logits -> c·tanh(logits / c) (Gemma 2/3); 0: off

    def with_default_recipe(self) -> "ModelConfig":
        """This config with the block's recipe fields (RECIPE_FIELDS) at their defaults."""
        defaults = ModelConfig()
        return dataclasses.replace(self, **{f: getattr(defaults, f) for f in RECIPE_FIELDS})
    # The attention layer (key of layers.ATTENTION_LAYERS): gqa (grouped-query attention) or mla
    # (multi-head latent attention, with the dimensions in `mla`); attention_kind still masks it.
    attention_layer: str = "gqa"
    mla: MlaConfig = MlaConfig()
    # dtype of the KV cache in cached decoding: "auto" (the compute dtype), "float32", "bfloat16",
    # or "int8" (symmetric, one float32 scale per token and KV head; ops.quantize_kv).
    kv_cache_dtype: str = "auto"

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads


# ModelConfig's fields that choose the block's recipe (beyond sizes, attention kind and MLP kind).
RECIPE_FIELDS = ("norm_kind", "norm_placement", "qk_norm", "attn_out_bias", "mlp_bias", "position_kind",
                 "max_positions", "attention_pattern", "rope_thetas", "query_scale", "attn_logit_softcap",
                 "embed_scale", "embed_norm", "final_logit_softcap")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; one of them may be -1 (use the remaining devices). With several slices
    (TPU pods joined over the data-centre network, DCN) these are the sizes inside one slice and
    the dcn_* sizes split the slices: an axis spans dcn_<axis> x <axis> devices in all."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1
    # Across slices only data and fsdp: their traffic (gradient reduction, weight gathers once per
    # layer) tolerates DCN bandwidth; tensor and expert exchange activations every layer.
    dcn_data: int = 1
    dcn_fsdp: int = 1

    @property
    def num_slices(self) -> int:
        return self.dcn_data * self.dcn_fsdp


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
    # Regexes over parameter paths that get no updates (frozen parts: "^vision/" keeps a
    # vision-language model's image tower fixed; their optimizer state is empty).
    freeze: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 32  # global batch, in sequences
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    z_loss: float = 0.0  # weight of log(Z)^2 on the LM logits
    # Sequence positions whose logits exist at once in the loss (0: all): the output projection
    # and cross entropy run chunk by chunk and are recomputed in the backward pass, so a large
    # vocabulary never holds [batch, seq_len, vocab] float32 logits and their gradient.
    loss_chunk: int = 0
    log_every: int = 25
    eval_every: int = 250
    eval_batches: int = 8
    progress_bar: bool = True
    # Decay of an exponential moving average of the params kept in the train state, used for
    # evaluation and restored for sampling and the tools (training/ema.py); 0 disables.
    ema_decay: float = 0.0


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
    # Labelled text (family "classifier", jaxllm/labelled.py). dataset: "folder" (`path` holds one
    # subfolder of text files per class), "jsonl" or "csv" (`path` is a file with `text_feature`
    # and `label_feature` fields/columns), "stdlib_packages" (the embedded task: snippets of the
    # standard library labelled by top-level package), or a TFDS supervised dataset by name.
    path: str = ""
    label_feature: str = "label"
    classes: tuple[str, ...] = ()  # the class names in label order; empty: sorted names found in the data
    padding_side: str = "right"  # where examples shorter than seq_len are padded: right | left
    # Images (families "vlm" and "late_fusion", jaxllm/images.py). dataset: "digits" (the embedded
    # task), "image_folder" (`path` holds one subfolder of images per class), "image_jsonl" (`path`
    # is a file of {"image": file, "text" | "prompt" + "answer", "label"} records), or a TFDS image
    # dataset by name with `image_feature` and a label or `text_feature`.
    image_feature: str = "image"
    resize_images: bool = True  # resize decoded images to vision.image_size; False: a wrong size is an error
    blank_images: bool = False  # replace every image by zeros: the same model without the image (ablation)
    # Training images only, drawn from (seed, step, row); 0 = off: a translation by up to
    # augment_shift whole pixels each way (zero fill) and a rotation by up to augment_rotate degrees.
    augment_shift: int = 0
    augment_rotate: float = 0.0
    # A document transform applied before tokenizing (key of data.DOCUMENT_TRANSFORMS); "" = none.
    # kg_facts (jaxllm/knowledge): the facts of the entities a document mentions, fused into it.
    transform: str = ""
    kg_triples: str = ""  # a .jsonl file or a prepared TFDS dataset of triples; "" = the embedded stdlib graph
    kg_format: str = "preamble"  # preamble (a "# fact: ..." block before the text) | appendix (after it)
    kg_max_facts: int = 8  # facts fused into one document at most (the most specific entities first)
    kg_held_out: float = 0.0  # share of triples (by hash) never fused: the QA evaluation's held-out part

@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The ViT image tower of families "vlm" and "late_fusion" (models/vit.py) and the projector
    that maps its patch features into the language model's width."""

    image_size: int = 32  # images are image_size x image_size pixels
    patch_size: int = 4  # (image_size / patch_size)^2 image tokens
    channels: int = 3
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 352
    posemb: str = "learned"  # learned | sincos2d
    projector: str = "linear"  # linear | mlp (LLaVA's mlp2x_gelu)
    # Pixel normalisation after scaling to [0, 1]: (x - mean) / std, per channel or one for all.
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Sequence classification (family "classifier"): a backbone decoder, pooled, and a score head."""

    num_classes: int = 2
    # last (the last non-padding token, as Hugging Face's score head) | mean | first (an encoder's
    # [CLS] token)
    pooling: str = "last"
    backbone: str = "decoder"  # key of models.classifier.BACKBONES: decoder | encoder (models/masked_lm.py)
    pooler: bool = False  # BERT's pooler: tanh(pooled W + b) before the score head
    score_bias: bool = False  # a bias on the score head (BertForSequenceClassification)


@dataclasses.dataclass(frozen=True)
class MaskedLMConfig:
    """BERT's masking (family "masked_lm", jaxllm/masking.py): `rate` of the maskable tokens are
    chosen (whole words with `whole_word`); of those, `mask_fraction` become [MASK],
    `random_fraction` a random token and the rest stay; the loss is on the chosen tokens only."""

    rate: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    whole_word: bool = False


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021) on the kernels whose paths match `targets`."""

    rank: int = 8
    alpha: float = 16.0  # the update is (alpha / rank) · A B
    dropout: float = 0.0  # on the adapter's input
    targets: tuple[str, ...] = (r"(^|/)attn/(q|k|v|o)$",)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """What a run started from `init_from` trains: everything (full), only the new head (probe, a
    frozen backbone) or low-rank adapters plus the head (lora)."""

    mode: str = "full"  # full | probe | lora
    lora: LoraConfig = LoraConfig()


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
    family: str = "causal_lm"  # key of models.MODELS: the module, its loss and its batches
    # A run directory (trained here, or imported with `python -m jaxllm.hf import`) whose latest
    # params start this run when its own workdir has no checkpoint yet: fine-tuning. Empty: init.
    init_from: str = ""
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    opt: OptConfig = OptConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    distributed: DistributedConfig = DistributedConfig()
    distill: DistillConfig = DistillConfig()
    prune: PruneConfig = PruneConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    mlm: MaskedLMConfig = MaskedLMConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    vision: VisionConfig = VisionConfig()
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


def read_config_json(workdir: str) -> dict:
    """The config a run was started with (written to <workdir>/config.json at start)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a jaxllm run directory (run an experiment with "
            f"workdir={workdir} first)"
        )
    with open(path) as f:
        return json.load(f)
