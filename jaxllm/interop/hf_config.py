"""Hugging Face `config.json` <-> jaxllm ModelConfig for the Llama family of architectures: Llama
(incl. Llama 3 rope scaling), Mistral (sliding window), Qwen2 (q/k/v biases) and Mixtral (MoE).

Every field that changes the mathematics is mapped; a field the model cannot represent is a
one-line error naming it, never a silent approximation.
"""

from __future__ import annotations

import dataclasses

from jaxllm.config import ConfigError, ModelConfig, MoeConfig, RopeScalingConfig

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "MixtralForCausalLM": "mixtral"}


class HFError(ConfigError):
    """A Hugging Face checkpoint jaxllm cannot read or write as asked; the message says why."""


def architecture(hf: dict) -> str:
    names = hf.get("architectures") or []
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        raise HFError(f"config.json architectures={names}: jaxllm imports one of {', '.join(ARCHITECTURES)}")
    return names[0]


def _unsupported(hf: dict, arch: str) -> None:
    """Fields whose non-default values jaxllm's model would silently ignore."""
    checks = [
        ("hidden_act", hf.get("hidden_act", "silu") not in ("silu", "swish"), "only silu (SwiGLU) is supported"),
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


def _rope(hf: dict) -> tuple[float, dict]:
    """(theta, scaling) from either layout: transformers 4 (rope_theta and rope_scaling at the top)
    or 5 (both inside rope_parameters)."""
    parameters = hf.get("rope_parameters") or {}
    theta = float(hf.get("rope_theta", parameters.get("rope_theta", 10_000.0)))
    return theta, hf.get("rope_scaling") or parameters


def _rope_scaling(hf: dict) -> RopeScalingConfig:
    _, scaling = _rope(hf)
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return RopeScalingConfig()
    if kind != "llama3":
        raise HFError(f"config.json rope_scaling type {kind!r} cannot be represented: jaxllm supports llama3")
    return RopeScalingConfig(
        kind="llama3", factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_len=int(scaling["original_max_position_embeddings"]))


def model_config(hf: dict, tokenizer: str = "bytes", base: ModelConfig = ModelConfig()) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json; layout options (scan, remat, dtypes) come
    from `base`."""
    arch = architecture(hf)
    _unsupported(hf, arch)
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
    return cfg


def hf_architecture(cfg: ModelConfig) -> str:
    """The Hugging Face architecture that represents `cfg`, or an error saying what does not fit."""
    m = cfg.moe
    if cfg.mlp_kind != "swiglu":
        raise HFError(f"model.mlp_kind={cfg.mlp_kind} has no Hugging Face counterpart (swiglu and MoE have)")
    if cfg.attention_kind not in ("causal", "dot_product", "sliding_window"):
        raise HFError(f"model.attention_kind={cfg.attention_kind} has no Hugging Face causal-LM counterpart")
    if m.num_experts:
        problems = [name for name, bad in (
            ("model.moe.every", m.every != 1), ("model.moe.num_shared", m.num_shared > 0),
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


def hf_config(cfg: ModelConfig, special_ids: dict, torch_dtype: str) -> dict:
    """config.json for `cfg` (the inverse of `model_config`)."""
    arch = hf_architecture(cfg)
    out = {
        "architectures": [arch], "model_type": MODEL_TYPES[arch],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
        "intermediate_size": cfg.mlp_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": max(cfg.rope_scaling.original_max_len, 4096),
        "torch_dtype": torch_dtype, "dtype": torch_dtype, "attention_dropout": 0.0, **special_ids,
    }
    if cfg.rope_scaling.kind == "llama3":
        r = cfg.rope_scaling
        # Both layouts: transformers 4 reads rope_scaling, 5 rope_parameters.
        out["rope_scaling"] = {"rope_type": "llama3", "factor": r.factor, "low_freq_factor": r.low_freq_factor,
                               "high_freq_factor": r.high_freq_factor, "original_max_position_embeddings": r.original_max_len}
        out["rope_parameters"] = {**out["rope_scaling"], "rope_theta": cfg.rope_theta}
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        out["sliding_window"] = cfg.window or None
    if arch == "Qwen2ForCausalLM":
        out["use_sliding_window"] = False
    if arch == "MixtralForCausalLM":
        out.update(num_local_experts=cfg.moe.num_experts, num_experts_per_tok=cfg.moe.top_k,
                   router_aux_loss_coef=cfg.moe.aux_loss_weight, router_jitter_noise=cfg.moe.jitter)
    return out
