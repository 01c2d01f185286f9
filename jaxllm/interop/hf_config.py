"""Hugging Face `config.json` <-> jaxllm ModelConfig: the Llama family (Llama incl. Llama 3 and YaRN rope
scaling, Mistral's sliding window, Qwen2's q/k/v biases, Mixtral's MoE), Qwen3 (q/k norms),
Qwen3-MoE (fine-grained experts, normalised top-k), Gemma 2 / Gemma 3 (GeGLU, sandwich norms
with 1 + w, scaled embeddings, local:global attention pattern, soft-caps) and DeepSeek-V3
(multi-head latent attention, dense first blocks, shared experts, sigmoid group-limited routing
with a correction bias).

Every field that changes the mathematics is mapped; a field the model cannot represent is a
one-line error naming it, never a silent approximation.
"""

from __future__ import annotations

import dataclasses
import json
import math

from jaxllm.config import RECIPE_FIELDS, ConfigError, MlaConfig, ModelConfig, MoeConfig, RopeScalingConfig
from jaxllm.layers.base import yarn_mscale

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM",
                 "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
                 "DeepseekV3ForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "MixtralForCausalLM": "mixtral", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3_moe",
               "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
               "DeepseekV3ForCausalLM": "deepseek_v3"}
GEMMA = ("Gemma2ForCausalLM", "Gemma3ForCausalLM")
QWEN3 = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
DEEPSEEK = "DeepseekV3ForCausalLM"
# Gemma's layer_types -> jaxllm attention kinds.
LAYER_TYPES = {"sliding_attention": "sliding_window", "full_attention": "causal"}


class HFError(ConfigError):
    """A Hugging Face checkpoint jaxllm cannot read or write as asked; the message says why."""


def read_config(path: str) -> dict:
    """The JSON object in `path` (a config.json), or a one-line error naming the file."""
    try:
        with open(path) as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise HFError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise HFError(f"{path} is not valid JSON (not UTF-8 text: {e.reason})") from None
    if not isinstance(values, dict):
        raise HFError(f"{path} holds a JSON {type(values).__name__}, not an object of config fields")
    return values


def architecture(hf: dict) -> str:
    """The one architecture of config.json, which its model_type (where given) must agree with."""
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise HFError(f"config.json architectures={names}: jaxllm imports one of {', '.join(ARCHITECTURES)}")
    arch = names[0]
    if "model_type" in hf and hf["model_type"] != MODEL_TYPES[arch]:
        raise HFError(f"config.json model_type={hf['model_type']!r} disagrees with architectures={names} "
                      f"(model_type {MODEL_TYPES[arch]!r}); fix whichever is wrong")
    return arch


def _unsupported(hf: dict, arch: str) -> None:
    """Fields whose non-default values jaxllm's model would silently ignore."""
    gemma = arch in GEMMA
    checks = [
        ("hidden_act", not gemma and hf.get("hidden_act", "silu") not in ("silu", "swish"), "only silu (SwiGLU) is supported"),
        ("hidden_activation", gemma and hf.get("hidden_activation", "gelu_pytorch_tanh") not in ("gelu_pytorch_tanh",),
         "Gemma's MLP is GeGLU with gelu_pytorch_tanh"),
        ("use_sliding_window", arch in QWEN3 and bool(hf.get("use_sliding_window", False)),
         "Qwen3's per-layer sliding window is not supported"),
        ("use_bidirectional_attention", bool(hf.get("use_bidirectional_attention")),
         "bidirectional attention in a causal LM is not supported"),
        ("attention_bias", bool(hf.get("attention_bias", False)), "biases on q/k/v/o are not supported (Qwen2's q/k/v biases are)"),
        ("mlp_bias", bool(hf.get("mlp_bias", False)), "MLP biases are not supported"),
        ("use_sliding_window", arch == "Qwen2ForCausalLM" and bool(hf.get("use_sliding_window", False)),
         "Qwen2's per-layer sliding window is not supported"),
        ("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0) != 1.0, "partial rotary embeddings are not supported"),
        ("attention_dropout", hf.get("attention_dropout", 0.0) not in (0, 0.0, None), "attention dropout is not supported"),
    ]
    for name, bad, why in checks:
        if bad:
            raise HFError(f"config.json {name}={hf.get(name)!r} cannot be represented: {why}")


def _rope(hf: dict, layer_type: str = "full_attention") -> tuple[float, dict]:
    """(theta, scaling) from either layout: transformers 4 (rope_theta and rope_scaling at the top;
    Gemma 3's local layers: rope_local_base_freq, unscaled) or 5 (both inside rope_parameters, per
    layer type for Gemma 3)."""
    parameters = hf.get("rope_parameters") or {}
    if layer_type in parameters:  # per layer type: that entry decides, whatever the top level says
        parameters = parameters[layer_type] or {}
        return float(parameters.get("rope_theta", hf.get("rope_theta", 10_000.0))), parameters
    if layer_type == "sliding_attention" and "rope_local_base_freq" in hf:
        return float(hf["rope_local_base_freq"]), {}
    theta = float(hf.get("rope_theta", parameters.get("rope_theta", 10_000.0)))
    return theta, hf.get("rope_scaling") or parameters


def _rope_scaling(hf: dict, layer_type: str = "full_attention") -> RopeScalingConfig:
    _, scaling = _rope(hf, layer_type)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return RopeScalingConfig()
    if kind == "linear":
        return RopeScalingConfig(kind="linear", factor=float(scaling["factor"]))
    if kind == "yarn":
        return _yarn(hf, scaling)
    if kind != "llama3":
        raise HFError(f"config.json rope_scaling type {kind!r} cannot be represented: jaxllm supports linear, llama3 and yarn")
    return RopeScalingConfig(
        kind="llama3", factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_len=int(scaling["original_max_position_embeddings"]))


def _yarn(hf: dict, scaling: dict) -> RopeScalingConfig:
    """YaRN with transformers' defaults: original_max_position_embeddings from the top level (which
    wins), the scaling or max_position_embeddings; factor their ratio where missing; beta_fast 32
    and beta_slow 1 where missing or 0; the attention factor derived where missing."""
    original = int(hf.get("original_max_position_embeddings") or scaling.get("original_max_position_embeddings")
                   or hf["max_position_embeddings"])
    factor = scaling.get("factor")
    factor = float(hf["max_position_embeddings"] / original if factor is None else factor)
    if scaling.get("attention_factor") is not None and float(scaling["attention_factor"]) <= 0:
        raise HFError(f"config.json rope_scaling attention_factor={scaling['attention_factor']!r} cannot be represented: "
                      f"it must be positive")
    return RopeScalingConfig(
        kind="yarn", factor=factor, original_max_len=original, beta_fast=float(scaling.get("beta_fast") or 32),
        beta_slow=float(scaling.get("beta_slow") or 1), mscale=float(scaling.get("mscale") or 0),
        mscale_all_dim=float(scaling.get("mscale_all_dim") or 0), attention_factor=float(scaling.get("attention_factor") or 0),
        truncate=bool(scaling.get("truncate", True)))


def _layer_types(hf: dict, arch: str) -> list[str]:
    """Gemma's per-layer attention: layer_types, or the older pattern fields (Gemma 2: local on even
    layers; Gemma 3: every sliding_window_pattern-th layer global)."""
    n = int(hf["num_hidden_layers"])
    if hf.get("layer_types"):
        types = list(hf["layer_types"])
    elif arch == "Gemma2ForCausalLM":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    else:
        period = int(hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6)))
        types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n)]
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if len(types) != n or unknown:
        raise HFError(f"config.json layer_types={types} cannot be represented: give {n} of {', '.join(LAYER_TYPES)}")
    return types


def _gemma_fields(hf: dict, arch: str, base: ModelConfig) -> dict:
    """Gemma 2/3's recipe: GeGLU, sandwich norms with 1 + w, embeddings times sqrt(d), the score
    scale query_pre_attn_scalar^-1/2, soft-caps, and the local:global pattern (the shortest period
    of layer_types) with each entry's RoPE base."""
    types = _layer_types(hf, arch)
    period = next(p for p in range(1, len(types) + 1)
                  if all(t == types[i % p] for i, t in enumerate(types)))
    pattern = tuple(LAYER_TYPES[t] for t in types[:period])
    global_theta = _rope(hf, "full_attention")[0]
    if _rope_scaling(hf, "sliding_attention").kind != "none":
        raise HFError("config.json: RoPE scaling of the sliding-window layers cannot be represented")
    local_theta = _rope(hf, "sliding_attention")[0]
    thetas = tuple(local_theta if t == "sliding_attention" else 0.0 for t in types[:period])
    fields = dict(
        norm_kind="rmsnorm_plus_one", norm_placement="sandwich", qk_norm=arch == "Gemma3ForCausalLM",
        mlp_kind="geglu", embed_scale=math.sqrt(int(hf["hidden_size"])),
        query_scale=float(hf.get("query_pre_attn_scalar") or 0) ** -0.5 if hf.get("query_pre_attn_scalar") else 0.0,
        attn_logit_softcap=float(hf.get("attn_logit_softcapping") or 0.0),
        final_logit_softcap=float(hf.get("final_logit_softcapping") or 0.0),
        attention_pattern=pattern if "sliding_window" in pattern else (),
        rope_thetas=thetas if any(t != global_theta and t for t in thetas) else (),
        attention_kind="sliding_window" if pattern == ("sliding_window",) else "causal",
        window=int(hf.get("sliding_window") or 0) if "sliding_window" in pattern else 0,
        rope_theta=global_theta, rope_scaling=_rope_scaling(hf, "full_attention"),
    )
    if len(pattern) == 1:
        fields["attention_pattern"], fields["rope_thetas"] = (), ()
    if base.scan_layers and len(types) % period:
        fields["scan_layers"] = False  # the scan repeats whole periods of the pattern
    return fields


def _deepseek_unsupported(hf: dict) -> None:
    """DeepSeek-V3 fields whose values jaxllm's model would not reproduce."""
    _, scaling = _rope(hf)
    kind = scaling.get("rope_type", scaling.get("type"))
    heads = int(hf["num_attention_heads"])
    checks = [
        ("rope_scaling", kind, kind not in (None, "default", "yarn"),
         "of multi-head latent attention only YaRN (DeepSeek-V3's) is supported"),
        ("rms_norm_eps", hf.get("rms_norm_eps"), float(hf.get("rms_norm_eps", 1e-6)) != 1e-6,
         "the latent norms use transformers' fixed 1e-6, so jaxllm's one norm_eps must be 1e-6"),
        ("num_key_value_heads", hf.get("num_key_value_heads"), int(hf.get("num_key_value_heads") or heads) != heads,
         "multi-head latent attention expands the latent into one key per query head"),
        ("scoring_func", hf.get("scoring_func"), hf.get("scoring_func", "sigmoid") != "sigmoid",
         "only DeepSeek-V3's sigmoid affinities are supported"),
        ("topk_method", hf.get("topk_method"), hf.get("topk_method", "noaux_tc") != "noaux_tc",
         "only DeepSeek-V3's noaux_tc routing is supported"),
        ("moe_layer_freq", hf.get("moe_layer_freq"), int(hf.get("moe_layer_freq", 1)) != 1,
         "transformers makes every block after the dense ones MoE"),
    ]
    for name, value, bad, why in checks:
        if bad:
            raise HFError(f"config.json {name}={value!r} cannot be represented: {why}")


def _deepseek_fields(hf: dict) -> dict:
    """DeepSeek-V3's recipe: multi-head latent attention, first_k_dense_replace dense blocks, then
    MoE blocks of sigmoid-routed experts (top k of affinity + e_score_correction_bias inside the
    topk_group best of n_group groups, weighted by the affinities, normalised if norm_topk_prob,
    times routed_scaling_factor) plus n_shared_experts shared ones. Missing fields take
    transformers' defaults."""
    mla = MlaConfig(q_lora_rank=int(hf.get("q_lora_rank") or 0), kv_lora_rank=int(hf["kv_lora_rank"]),
                    qk_nope_head_dim=int(hf["qk_nope_head_dim"]), qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
                    v_head_dim=int(hf["v_head_dim"]))
    fields = dict(attention_layer="mla", mla=mla, num_kv_heads=int(hf["num_attention_heads"]),
                  head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim,
                  query_scale=deepseek_query_scale(mla, _rope_scaling(hf)))
    first = int(hf.get("first_k_dense_replace", 3) or 0)
    experts = int(hf.get("n_routed_experts", hf.get("num_local_experts", 256)) or 0)
    if experts and first < int(hf["num_hidden_layers"]):
        # Aux-loss-free: no balance loss; the bias moves only if model.moe.bias_update_rate is set.
        fields["moe"] = MoeConfig(
            num_experts=experts, top_k=int(hf.get("num_experts_per_tok", 8)),
            expert_dim=int(hf.get("moe_intermediate_size", 2048)), num_shared=int(hf.get("n_shared_experts", 1) or 0),
            router="sigmoid", renormalize=bool(hf.get("norm_topk_prob", True)),
            routed_scale=float(hf.get("routed_scaling_factor", 2.5)), router_bias=True,
            num_groups=int(hf.get("n_group", 8) or 1), topk_groups=int(hf.get("topk_group", 4) or 1),
            first_dense=first, dispatch="dropless", aux_loss_weight=0.0, z_loss_weight=0.0)
    return fields


def deepseek_query_scale(mla: MlaConfig, scaling: RopeScalingConfig) -> float:
    """model.query_scale of DeepSeek-V3's attention: with YaRN and mscale_all_dim, transformers
    multiplies the score scale (A + R)^-1/2 by mscale(factor, mscale_all_dim)^2; 0 (the default
    (A + R)^-1/2) otherwise."""
    if scaling.kind != "yarn" or not scaling.mscale_all_dim:
        return 0.0
    m = yarn_mscale(scaling.factor, scaling.mscale_all_dim)
    return (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** (-0.5) * m * m  # transformers' order of operations


def _moe_layers(num_layers: int, first: int, every: int) -> set[int]:
    """The MoE blocks of jaxllm's layout (transformer.is_moe_layer)."""
    return {i for i in range(first, num_layers) if (i - first + 1) % every == 0}


def _qwen3_moe_layout(hf: dict) -> tuple[int, int]:
    """(model.moe.first_dense, model.moe.every) giving Qwen3-MoE's MoE blocks: block i is MoE when
    (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers. (0, 0) when no block is;
    a set no (first_dense, every) gives (a dense block after the first MoE one other than every
    k-th) is a one-line error."""
    n, step = int(hf["num_hidden_layers"]), int(hf.get("decoder_sparse_step") or 1)
    dense = {int(i) for i in hf.get("mlp_only_layers") or []}
    want = {i for i in range(n) if (i + 1) % step == 0 and i not in dense}
    if not want:
        return 0, 0
    # decoder_sparse_step itself first: an exported model reads back as it was.
    for every in (step, *range(1, n + 1)):
        first = min(want) - every + 1
        if first >= 0 and (n - first) % every == 0 and _moe_layers(n, first, every) == want:
            return first, every
    raise HFError(f"config.json mlp_only_layers={sorted(dense)} with decoder_sparse_step={step} cannot be represented: "
                  f"jaxllm's MoE blocks are every model.moe.every-th after model.moe.first_dense dense ones, "
                  f"through the last block (MoE blocks here: {sorted(want)})")


def interleaved_rope_dims(hf: dict) -> int:
    """The RoPE dimensions whose q/k projection rows a checkpoint stores as DeepSeek's interleaved
    pairs (x0, x1), (x2, x3), ... (rope_interleave, transformers' default): jaxllm's rotate-half
    RoPE reads them permuted (evens, then odds), which gives the same scores. 0: none."""
    if architecture(hf) == DEEPSEEK and hf.get("rope_interleave", True):
        return int(hf["qk_rope_head_dim"])
    return 0


def model_config(hf: dict, tokenizer: str = "bytes", base: ModelConfig = ModelConfig()) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json; layout options (scan, remat, dtypes) come
    from `base`."""
    arch = architecture(hf)
    _unsupported(hf, arch)
    if arch == DEEPSEEK:
        _deepseek_unsupported(hf)
    base = base.with_default_recipe()  # the checkpoint, not the base, decides the block
    heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hf["hidden_size"] // heads)
    window = hf.get("sliding_window") if arch in ("MistralForCausalLM", "MixtralForCausalLM") else None
    cfg = dataclasses.replace(
        base,
        vocab_size=int(hf["vocab_size"]),
        tokenizer=tokenizer,
        d_model=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        mlp_dim=int(hf["intermediate_size"]),
        mlp_kind="swiglu",
        attention_kind="sliding_window" if window else "causal",
        window=int(window or 0),
        rope_theta=_rope(hf)[0],
        rope_scaling=_rope_scaling(hf),
        qkv_bias=arch == "Qwen2ForCausalLM",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe=MoeConfig(),
    )
    if arch == "MixtralForCausalLM":
        cfg = dataclasses.replace(cfg, moe=MoeConfig(
            num_experts=int(hf["num_local_experts"]), top_k=int(hf["num_experts_per_tok"]),
            expert_dim=int(hf["intermediate_size"]), router="topk_softmax", dispatch="dropless",
            jitter=float(hf.get("router_jitter_noise", 0.0) or 0.0),
            aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.02)), z_loss_weight=0.0))
    if arch in QWEN3:
        cfg = dataclasses.replace(cfg, qk_norm=True)
    # transformers 5 writes num_local_experts, the Hub's checkpoints num_experts.
    experts = int(hf.get("num_experts", hf.get("num_local_experts")) or 0)
    if arch == "Qwen3MoeForCausalLM" and experts:
        # Softmax over all experts, top k, renormalised when norm_topk_prob; the MoE blocks (every
        # decoder_sparse_step-th, less mlp_only_layers) have experts of moe_intermediate_size.
        first, every = _qwen3_moe_layout(hf)
        if every:
            cfg = dataclasses.replace(cfg, moe=MoeConfig(
                num_experts=experts, top_k=int(hf["num_experts_per_tok"]),
                expert_dim=int(hf["moe_intermediate_size"]), every=every, first_dense=first,
                router="softmax_topk", renormalize=bool(hf.get("norm_topk_prob", False)), dispatch="dropless",
                aux_loss_weight=float(hf.get("router_aux_loss_coef", 0.001)), z_loss_weight=0.0))
        if cfg.scan_layers and (cfg.num_layers - cfg.moe.first_dense) % cfg.moe.every:
            cfg = dataclasses.replace(cfg, scan_layers=False)
    if arch in GEMMA:
        cfg = dataclasses.replace(cfg, **_gemma_fields(hf, arch, base))
    if arch == DEEPSEEK:
        cfg = dataclasses.replace(cfg, **_deepseek_fields(hf))
    return cfg



# The recipe fields (config.RECIPE_FIELDS) each exported family may set; ModelConfig's defaults elsewhere.
_FAMILY_RECIPES = {
    "llama": (),
    "qwen3": ("qk_norm",),
    "gemma2": ("norm_kind", "norm_placement", "attention_pattern", "query_scale", "attn_logit_softcap",
               "embed_scale", "final_logit_softcap"),
}
_FAMILY_RECIPES["gemma3"] = (*_FAMILY_RECIPES["gemma2"], "qk_norm", "rope_thetas")
_FAMILY_RECIPES["deepseek_v3"] = ("query_scale",)  # set by YaRN's mscale_all_dim, checked in hf_architecture


def _check_recipe(cfg: ModelConfig, family: str, arch: str) -> None:
    defaults = ModelConfig()
    bad = [f"model.{f}" for f in RECIPE_FIELDS
           if f not in _FAMILY_RECIPES[family] and getattr(cfg, f) != getattr(defaults, f)]
    if bad:
        raise HFError(f"{', '.join(bad)} differ(s) from {arch}'s recipe: this model has no Hugging Face counterpart")


def _check_gemma(cfg: ModelConfig, arch: str) -> None:
    kinds = cfg.attention_pattern or (cfg.attention_kind,)
    problems = [name for name, bad in (
        ("model.norm_placement", cfg.norm_placement != "sandwich"), ("model.mlp_kind", cfg.mlp_kind != "geglu"),
        ("model.embed_scale", cfg.embed_scale != math.sqrt(cfg.d_model)), ("model.qkv_bias", cfg.qkv_bias),
        ("model.moe", cfg.moe.num_experts > 0),
        ("model.attention_pattern", any(k not in ("causal", "dot_product", "sliding_window") for k in kinds)),
        ("model.rope_thetas", len({t for t, k in zip(cfg.rope_thetas, kinds) if k == "sliding_window"}) > 1
         or any(t not in (0, cfg.rope_theta) for t, k in zip(cfg.rope_thetas, kinds) if k != "sliding_window")),
    ) if bad]
    if problems:
        raise HFError(f"this model is not a {arch[:-len('ForCausalLM')]}: {', '.join(problems)} differ(s) from its recipe")


def hf_architecture(cfg: ModelConfig) -> str:
    """The Hugging Face architecture that represents `cfg`, or an error saying what does not fit."""
    m = cfg.moe
    if cfg.attention_layer == "mla":
        _check_recipe(cfg, "deepseek_v3", DEEPSEEK)
        problems = [name for name, bad in (
            ("model.mlp_kind", cfg.mlp_kind != "swiglu"), ("model.qkv_bias", cfg.qkv_bias),
            ("model.attention_kind", cfg.attention_kind not in ("causal", "dot_product")),
            ("model.rope_scaling", cfg.rope_scaling.kind not in ("none", "yarn")), ("model.norm_eps", cfg.norm_eps != 1e-6),
            ("model.query_scale", cfg.query_scale != deepseek_query_scale(cfg.mla, cfg.rope_scaling)),
            ("model.moe.router", m.num_experts and m.router != "sigmoid"),
            ("model.moe.router_bias", m.num_experts and not m.router_bias), ("model.moe.every", m.num_experts and m.every != 1),
            ("model.moe.num_shared", m.num_experts and m.num_shared < 1),
            ("model.moe.shared_dim", m.num_experts and m.shared_dim not in (0, m.expert_dim or cfg.mlp_dim)),
        ) if bad]
        if problems:
            raise HFError(f"this model is not a DeepseekV3: {', '.join(problems)} differ(s) from its recipe")
        return DEEPSEEK
    if cfg.norm_kind == "rmsnorm_plus_one":
        arch = "Gemma3ForCausalLM" if cfg.qk_norm else "Gemma2ForCausalLM"
        _check_recipe(cfg, "gemma3" if cfg.qk_norm else "gemma2", arch)
        _check_gemma(cfg, arch)
        return arch
    if cfg.qk_norm:
        arch = "Qwen3MoeForCausalLM" if m.num_experts else "Qwen3ForCausalLM"
        _check_recipe(cfg, "qwen3", arch)
        problems = [name for name, bad in (
            ("model.mlp_kind", cfg.mlp_kind != "swiglu"), ("model.qkv_bias", cfg.qkv_bias),
            ("model.attention_kind", cfg.attention_kind not in ("causal", "dot_product")),
            ("model.moe.num_shared", m.num_shared > 0), ("model.moe.router", m.num_experts and m.router != "softmax_topk"),
        ) if bad]
        if problems:
            raise HFError(f"this model is not a {arch[:-len('ForCausalLM')]}: {', '.join(problems)} differ(s) from its recipe")
        return arch
    _check_recipe(cfg, "llama", "LlamaForCausalLM")
    if cfg.mlp_kind != "swiglu":
        raise HFError(f"model.mlp_kind={cfg.mlp_kind} has no Hugging Face counterpart (swiglu and MoE have)")
    if cfg.attention_kind not in ("causal", "dot_product", "sliding_window"):
        raise HFError(f"model.attention_kind={cfg.attention_kind} has no Hugging Face causal-LM counterpart")
    if m.num_experts:
        problems = [name for name, bad in (
            ("model.moe.every", m.every != 1), ("model.moe.num_shared", m.num_shared > 0),
            ("model.moe.first_dense", m.first_dense > 0),
            ("model.moe.router", m.router != "topk_softmax"), ("model.qkv_bias", cfg.qkv_bias),
            ("model.moe.expert_dim", (m.expert_dim or cfg.mlp_dim) != cfg.mlp_dim)) if bad]
        if problems:
            raise HFError(f"this MoE model is not a Mixtral: {', '.join(problems)} differ(s) from Mixtral's")
        return "MixtralForCausalLM"
    if cfg.qkv_bias:
        if cfg.attention_kind == "sliding_window":
            raise HFError("model.qkv_bias with sliding-window attention has no Hugging Face counterpart")
        return "Qwen2ForCausalLM"
    if cfg.attention_kind == "sliding_window":
        return "MistralForCausalLM"
    return "LlamaForCausalLM"


def _rope_json(cfg: ModelConfig) -> dict:
    out = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    r = cfg.rope_scaling
    if r.kind == "linear":
        out = {"rope_type": "linear", "factor": r.factor, "rope_theta": cfg.rope_theta}
    elif r.kind == "llama3":
        out = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
               "high_freq_factor": r.high_freq_factor, "original_max_position_embeddings": r.original_max_len,
               "rope_theta": cfg.rope_theta}
    elif r.kind == "yarn":
        out = {"rope_type": "yarn", "factor": r.factor, "original_max_position_embeddings": r.original_max_len,
               "beta_fast": r.beta_fast, "beta_slow": r.beta_slow, "rope_theta": cfg.rope_theta}
        # The optional ones only where set: absent and 0 read the same.
        out.update({k: v for k, v in (("mscale", r.mscale), ("mscale_all_dim", r.mscale_all_dim),
                                      ("attention_factor", r.attention_factor)) if v})
        if not r.truncate:
            out["truncate"] = False
    return out


def _gemma_json(cfg: ModelConfig, arch: str) -> dict:
    kinds = cfg.attention_pattern or (cfg.attention_kind,)
    types = ["sliding_attention" if kinds[i % len(kinds)] == "sliding_window" else "full_attention"
             for i in range(cfg.num_layers)]
    local = [t for t, k in zip(cfg.rope_thetas, kinds) if k == "sliding_window" and t]
    scalar = cfg.query_scale ** -2 if cfg.query_scale else cfg.head_size
    out = {"hidden_activation": "gelu_pytorch_tanh", "layer_types": types, "sliding_window": cfg.window or None,
           "query_pre_attn_scalar": round(scalar) if abs(scalar - round(scalar)) < 1e-6 else scalar,
           "attn_logit_softcapping": cfg.attn_logit_softcap or None,
           "final_logit_softcapping": cfg.final_logit_softcap or None, "attention_bias": False}
    if arch == "Gemma3ForCausalLM":
        local_theta = local[0] if local else cfg.rope_theta
        # Both layouts: transformers 5 reads rope_parameters per layer type, 4 the top-level fields.
        out["rope_parameters"] = {"full_attention": _rope_json(cfg),
                                  "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}
        out["rope_local_base_freq"] = local_theta
    return out


def hf_config(cfg: ModelConfig, special_ids: dict, torch_dtype: str, source: dict | None = None) -> dict:
    """config.json for `cfg` (the inverse of `model_config`); `source`: the config.json the run was
    imported from, whose max_position_embeddings it keeps."""
    arch = hf_architecture(cfg)
    source = source or {}
    out = {
        "architectures": [arch], "model_type": MODEL_TYPES[arch],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
        "intermediate_size": cfg.mlp_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": source.get("max_position_embeddings") or max(cfg.rope_scaling.original_max_len, 4096),
        "torch_dtype": torch_dtype, "dtype": torch_dtype, "attention_dropout": 0.0, **special_ids,
    }
    if cfg.rope_scaling.kind != "none":
        # Both layouts: transformers 4 reads rope_scaling, 5 rope_parameters.
        out["rope_parameters"] = _rope_json(cfg)
        out["rope_scaling"] = {k: v for k, v in out["rope_parameters"].items() if k != "rope_theta"}
    if cfg.rope_scaling.kind == "yarn":
        # DeepSeek's own (remote) code reads rope_scaling["type"]; YaRN's context is factor times the original.
        out["rope_scaling"]["type"] = "yarn"
        if not source.get("max_position_embeddings"):
            out["max_position_embeddings"] = round(cfg.rope_scaling.original_max_len * cfg.rope_scaling.factor)
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        out["sliding_window"] = cfg.window or None
    if arch in ("Qwen2ForCausalLM", *QWEN3):
        out["use_sliding_window"] = False
    if arch in QWEN3:
        out["attention_bias"] = False
    if arch == "MixtralForCausalLM":
        out.update(num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k,
                   router_aux_loss_coef=cfg.moe.aux_loss_weight, router_jitter_noise=cfg.moe.jitter)
    if arch == "Qwen3MoeForCausalLM":
        m = cfg.moe
        # Qwen3-MoE's MoE blocks are every decoder_sparse_step-th less mlp_only_layers: a dense
        # prefix that is not whole periods takes step 1 and every dense block listed.
        step = m.every if m.first_dense % m.every == 0 else 1
        moe = _moe_layers(cfg.num_layers, m.first_dense, m.every)
        out.update(num_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=m.expert_dim or cfg.mlp_dim,
                   norm_topk_prob=m.renormalize, decoder_sparse_step=step,
                   mlp_only_layers=[i for i in range(cfg.num_layers) if (i + 1) % step == 0 and i not in moe],
                   router_aux_loss_coef=m.aux_loss_weight)
    if arch in GEMMA:
        del out["hidden_act"]
        out.update(_gemma_json(cfg, arch))
    if arch == DEEPSEEK:
        out.update(_deepseek_json(cfg))
    return out


def _deepseek_json(cfg: ModelConfig) -> dict:
    """DeepSeek-V3's fields; the q/k RoPE rows are written interleaved (rope_interleave), as the
    Hub's checkpoints and vLLM have them. scoring_func, topk_method and moe_layer_freq are for
    readers other than transformers."""
    a, m = cfg.mla, cfg.moe
    out = dict(num_key_value_heads=cfg.num_heads, head_dim=a.qk_rope_head_dim, q_lora_rank=a.q_lora_rank or None,
               kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
               v_head_dim=a.v_head_dim, rope_interleave=True, attention_bias=False, num_nextn_predict_layers=0)
    if not m.num_experts:  # every block dense
        return {**out, "first_k_dense_replace": cfg.num_layers, "n_routed_experts": 0, "n_shared_experts": 0}
    return {**out, "n_routed_experts": m.num_experts, "num_experts_per_tok": m.top_k,
            "moe_intermediate_size": m.expert_dim or cfg.mlp_dim, "n_shared_experts": m.num_shared,
            "routed_scaling_factor": m.routed_scale, "n_group": m.num_groups, "topk_group": m.topk_groups,
            "first_k_dense_replace": m.first_dense, "norm_topk_prob": m.renormalize, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc", "moe_layer_freq": 1}
