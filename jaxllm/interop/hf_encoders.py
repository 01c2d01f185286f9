"""Hugging Face checkpoints in and out for BERT and RoBERTa (masked LM and BERT's sequence
classifier) and GPT-2 (a causal LM): config.json <-> Config, safetensors <-> params.

    BertForMaskedLM, RobertaForMaskedLM     -> family masked_lm (models/masked_lm.py)
    BertForSequenceClassification           -> family classifier, classifier.backbone=encoder,
    RobertaForSequenceClassification           [CLS] pooling, BERT's pooler, score bias
    GPT2LMHeadModel                         -> family causal_lm with LayerNorm, learned positions,
                                               tanh-gelu MLP and biases

Layouts: a torch Linear weight is [out, in] (kernel = W.T reshaped); GPT-2's Conv1D weight is
already [in, out] (kernel = W reshaped), and its c_attn holds q, k and v side by side in its
columns. RoBERTa's position table starts at padding_idx + 1 (its first rows belong to padding):
jaxllm keeps the rows from there, so position p is row p as in BERT, and writes zeros back for
the rows it drops. RoBERTa's classification head (dense, tanh, out_proj on <s>) is BERT's pooler
and classifier under other names. Tied output projections are not stored (as transformers saves them).

Import reads as the Llama family's importer does (interop/hf.py): the target params are built
abstractly on the destination mesh and each device's shard is read from the safetensors files as
a block of the tensor it comes from (only the rows it needs are mapped), so no host holds the
whole model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import jax
import numpy as np
from safetensors.numpy import save_file

from jaxllm import restore, sharding
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.config import ClassifierConfig, Config, MoeConfig
from jaxllm.interop.hf import (DTYPES, TOKENIZER_FILES, SafetensorsFiles, _group_slice, _length, _normalise, aligned_empty,
                               copy_tokenizer, save_imported_run)
from jaxllm.interop.hf_config import HFError
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import workdir_lock

ARCHITECTURES = ("BertForMaskedLM", "BertForSequenceClassification", "RobertaForMaskedLM",
                 "RobertaForSequenceClassification", "GPT2LMHeadModel")
MODEL_TYPES = {"BertForMaskedLM": "bert", "BertForSequenceClassification": "bert", "RobertaForMaskedLM": "roberta",
               "RobertaForSequenceClassification": "roberta", "GPT2LMHeadModel": "gpt2"}
CLASSIFIERS = ("BertForSequenceClassification", "RobertaForSequenceClassification")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def architecture_of(hf: dict) -> str | None:
    """The config's architecture if this module handles it, else None."""
    names = hf.get("architectures") or []
    return names[0] if len(names) == 1 and names[0] in ARCHITECTURES else None


def handles(hf_dir: str) -> bool:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        try:
            return architecture_of(json.load(f)) is not None
        except json.JSONDecodeError:
            return False  # the decoder importer reports a broken config.json in one line


def _check(hf: dict, checks) -> None:
    for name, bad, why in checks:
        if bad:
            raise HFError(f"config.json {name}={hf.get(name)!r} cannot be represented: {why}")


def _activation(hf: dict, key: str) -> str:
    act = hf.get(key, "gelu")
    if act not in ACTIVATIONS:
        raise HFError(f"config.json {key}={act!r} cannot be represented: jaxllm has {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def config_from_hf(hf: dict, tokenizer: str, base: Config) -> Config:
    """The run config of a Hugging Face config.json (family, model, classifier); the rest from
    `base`, its train.seq_len capped at the position table's length."""
    cfg = _config_from_hf(hf, tokenizer, base)
    return dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, seq_len=min(cfg.train.seq_len, cfg.model.max_positions)))


def _config_from_hf(hf: dict, tokenizer: str, base: Config) -> Config:
    arch = architecture_of(hf)
    common = dict(tokenizer=tokenizer, vocab_size=int(hf["vocab_size"]), norm_kind="layernorm",
                  position_kind="learned", qkv_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
                  num_kv_heads=0, moe=MoeConfig())
    if arch == "GPT2LMHeadModel":
        _check(hf, [("scale_attn_weights", not hf.get("scale_attn_weights", True), "unscaled attention"),
                    ("scale_attn_by_inverse_layer_idx", hf.get("scale_attn_by_inverse_layer_idx", False),
                     "per-layer attention scaling"),
                    ("add_cross_attention", hf.get("add_cross_attention", False), "cross-attention")])
        d, heads = int(hf["n_embd"]), int(hf["n_head"])
        model = dataclasses.replace(
            base.model, **common, d_model=d, num_layers=int(hf["n_layer"]), num_heads=heads, head_dim=d // heads,
            mlp_dim=int(hf.get("n_inner") or 4 * d), mlp_kind=_activation(hf, "activation_function"),
            attention_kind="causal", max_positions=int(hf["n_positions"]), norm_placement="pre", embed_norm=False,
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), type_vocab_size=0)
        return dataclasses.replace(base, family="causal_lm", model=model)
    _check(hf, [("position_embedding_type", hf.get("position_embedding_type", "absolute") != "absolute",
                 "only absolute learned positions"),
                ("is_decoder", hf.get("is_decoder", False), "a BERT decoder")])
    d, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    offset = _position_offset(hf)
    model = dataclasses.replace(
        base.model, **common, d_model=d, num_layers=int(hf["num_hidden_layers"]), num_heads=heads,
        head_dim=d // heads, mlp_dim=int(hf["intermediate_size"]), mlp_kind=_activation(hf, "hidden_act"),
        attention_kind="bidirectional", max_positions=int(hf["max_position_embeddings"]) - offset,
        norm_placement="post", embed_norm=True, norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        type_vocab_size=int(hf.get("type_vocab_size", 2)))
    if arch not in CLASSIFIERS:
        return dataclasses.replace(base, family="masked_lm", model=model)
    labels = hf.get("id2label") or {}
    num = int(hf.get("num_labels") or len(labels) or 2)
    classes = tuple(str(labels.get(str(i), labels.get(i, f"LABEL_{i}"))) for i in range(num))
    return dataclasses.replace(
        base, family="classifier", model=model,
        classifier=ClassifierConfig(num_classes=num, pooling="first", backbone="encoder", pooler=True, score_bias=True),
        data=dataclasses.replace(base.data, classes=classes))


def _position_offset(hf: dict) -> int:
    """Rows of the position table before position 0: RoBERTa's padding_idx + 1, else 0."""
    return int(hf.get("pad_token_id", 1)) + 1 if hf.get("model_type") == "roberta" else 0


# ---------------------------------------------------------------------------------------------
# Tensor maps: one Rule per Hugging Face tensor


@dataclasses.dataclass(frozen=True)
class Rule:
    """Hugging Face tensor `name` (with {i} for the layer) <-> the jaxllm params `ours` (paths below
    the block for a layer's tensor). kind: "linear" (W [out, in] = kernel.T), "conv" (W [in, out] =
    kernel), "vector"; several `ours` sit side by side along the tensor's last axis (GPT-2's c_attn);
    `offset` rows of zeros come first (RoBERTa's positions)."""

    name: str
    ours: tuple[str, ...]
    kind: str = "vector"
    offset: int = 0

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.name


def _bert_rules(root: str, head: str | None, offset: int) -> list[Rule]:
    p = root + ".encoder.layer.{i}."
    rules = [Rule(f"{root}.embeddings.word_embeddings.weight", ("embed/embedding",)),
             Rule(f"{root}.embeddings.position_embeddings.weight", ("position_embed/embedding",), offset=offset),
             Rule(f"{root}.embeddings.token_type_embeddings.weight", ("token_type_embed/embedding",)),
             Rule(f"{root}.embeddings.LayerNorm.weight", ("embed_norm/scale",)),
             Rule(f"{root}.embeddings.LayerNorm.bias", ("embed_norm/bias",))]
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        rules += [Rule(p + f"attention.self.{theirs}.weight", (f"attn/{ours}",), "linear"),
                  Rule(p + f"attention.self.{theirs}.bias", (f"attn/{ours}_bias",))]
    rules += [Rule(p + "attention.output.dense.weight", ("attn/o",), "linear"),
              Rule(p + "attention.output.dense.bias", ("attn/o_bias",)),
              Rule(p + "attention.output.LayerNorm.weight", ("attn_norm/scale",)),
              Rule(p + "attention.output.LayerNorm.bias", ("attn_norm/bias",)),
              Rule(p + "intermediate.dense.weight", ("mlp/up",), "linear"),
              Rule(p + "intermediate.dense.bias", ("mlp/up_bias",)),
              Rule(p + "output.dense.weight", ("mlp/down",), "linear"),
              Rule(p + "output.dense.bias", ("mlp/down_bias",)),
              Rule(p + "output.LayerNorm.weight", ("mlp_norm/scale",)),
              Rule(p + "output.LayerNorm.bias", ("mlp_norm/bias",))]
    if head == "bert":
        t = "cls.predictions.transform."
        rules += [Rule(t + "dense.weight", ("mlm_head/dense",), "linear"), Rule(t + "dense.bias", ("mlm_head/dense_bias",)),
                  Rule(t + "LayerNorm.weight", ("mlm_head/norm/scale",)), Rule(t + "LayerNorm.bias", ("mlm_head/norm/bias",)),
                  Rule("cls.predictions.bias", ("mlm_head/bias",))]
    elif head == "roberta":
        rules += [Rule("lm_head.dense.weight", ("mlm_head/dense",), "linear"), Rule("lm_head.dense.bias", ("mlm_head/dense_bias",)),
                  Rule("lm_head.layer_norm.weight", ("mlm_head/norm/scale",)),
                  Rule("lm_head.layer_norm.bias", ("mlm_head/norm/bias",)), Rule("lm_head.bias", ("mlm_head/bias",))]
    return rules


def _gpt2_rules() -> list[Rule]:
    p = "transformer.h.{i}."
    return [Rule("transformer.wte.weight", ("embed/embedding",)),
            Rule("transformer.wpe.weight", ("position_embed/embedding",)),
            Rule("transformer.ln_f.weight", ("final_norm/scale",)), Rule("transformer.ln_f.bias", ("final_norm/bias",)),
            Rule(p + "ln_1.weight", ("attn_norm/scale",)), Rule(p + "ln_1.bias", ("attn_norm/bias",)),
            Rule(p + "ln_2.weight", ("mlp_norm/scale",)), Rule(p + "ln_2.bias", ("mlp_norm/bias",)),
            Rule(p + "attn.c_attn.weight", ("attn/q", "attn/k", "attn/v"), "conv"),
            Rule(p + "attn.c_attn.bias", ("attn/q_bias", "attn/k_bias", "attn/v_bias")),
            Rule(p + "attn.c_proj.weight", ("attn/o",), "conv"), Rule(p + "attn.c_proj.bias", ("attn/o_bias",)),
            Rule(p + "mlp.c_fc.weight", ("mlp/up",), "conv"), Rule(p + "mlp.c_fc.bias", ("mlp/up_bias",)),
            Rule(p + "mlp.c_proj.weight", ("mlp/down",), "conv"), Rule(p + "mlp.c_proj.bias", ("mlp/down_bias",))]


def rules(arch: str, hf: dict) -> list[Rule]:
    if arch == "GPT2LMHeadModel":
        return _gpt2_rules()
    if arch == "BertForSequenceClassification":
        return ([dataclasses.replace(r, ours=tuple(f"backbone/{o}" for o in r.ours)) for r in _bert_rules("bert", None, 0)]
                + [Rule("bert.pooler.dense.weight", ("pooler/kernel",), "linear"), Rule("bert.pooler.dense.bias", ("pooler/bias",)),
                   Rule("classifier.weight", ("score",), "linear"), Rule("classifier.bias", ("score_bias",))])
    if arch == "RobertaForSequenceClassification":
        backbone = _bert_rules("roberta", None, _position_offset(hf))
        return ([dataclasses.replace(r, ours=tuple(f"backbone/{o}" for o in r.ours)) for r in backbone]
                + [Rule("classifier.dense.weight", ("pooler/kernel",), "linear"), Rule("classifier.dense.bias", ("pooler/bias",)),
                   Rule("classifier.out_proj.weight", ("score",), "linear"), Rule("classifier.out_proj.bias", ("score_bias",))])
    head = "roberta" if arch == "RobertaForMaskedLM" else "bert"
    return _bert_rules(head, head, _position_offset(hf))


def _kernel_in_axes(path: str) -> int:
    """Input axes of a jaxllm kernel ([in..., out...]): the attention output's are two (heads, head dim)."""
    return 2 if path.endswith("attn/o") else 1


def _hf_shape(rule: Rule, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The shape of the Hugging Face tensor that holds the jaxllm arrays of `shapes`."""
    if rule.kind in ("linear", "conv"):
        n_in = _kernel_in_axes(rule.ours[0])
        ins, outs = math.prod(shapes[0][:n_in]), sum(math.prod(s[n_in:]) for s in shapes)
        return (outs, ins) if rule.kind == "linear" else (ins, outs)
    if rule.ours[0].endswith("embedding"):  # a table [rows, D]
        return (shapes[0][0] + rule.offset, shapes[0][1])
    return (sum(math.prod(s) for s in shapes),)


def _read_block(files: SafetensorsFiles, name: str, rule: Rule, shapes: list[tuple[int, ...]], part: int,
                index: tuple[slice, ...]) -> np.ndarray:
    """Block `index` of the jaxllm array rule.ours[part] (of shape shapes[part]) that tensor `name`
    holds, reading only the file rows the block needs: a kernel's input or output rows, a
    table's rows, a vector's span."""
    shape = shapes[part]
    if rule.kind in ("linear", "conv"):
        n_in = _kernel_in_axes(rule.ours[0])
        start = sum(math.prod(s[n_in:]) for s in shapes[:part])  # the part's first output column
        ins, rest_in = _group_slice(index[:n_in], shape[:n_in])
        outs, rest_out = _group_slice(index[n_in:], shape[n_in:])
        outs = slice(start + outs.start, start + outs.stop)
        block = files.rows(name, outs)[:, ins].T if rule.kind == "linear" else files.rows(name, ins)[:, outs]
        block = block.reshape(_length(index[0]), *shape[1:n_in], _length(index[n_in]), *shape[n_in + 1:])
        return block[(*rest_in, *rest_out)]
    if rule.ours[0].endswith("embedding"):
        return files.rows(name, slice(rule.offset + index[0].start, rule.offset + index[0].stop))[:, index[1]]
    start = sum(math.prod(s) for s in shapes[:part])
    flat, rest = _group_slice(index, shape)
    return files.rows(name, slice(start + flat.start, start + flat.stop)).reshape(_length(index[0]), *shape[1:])[rest]


def _to_theirs(rule: Rule, arrays: list[np.ndarray]) -> np.ndarray:
    if rule.kind in ("linear", "conv"):
        flat = [a.reshape(math.prod(a.shape[:_kernel_in_axes(rule.ours[0])]), -1) for a in arrays]
    else:
        # Tables ([rows, D]) stay two-dimensional; biases and norms are vectors.
        flat = [a if rule.ours[0].endswith("embedding") else a.reshape(-1) for a in arrays]
    tensor = np.concatenate(flat, axis=-1) if len(flat) > 1 else flat[0]
    if rule.offset:
        tensor = np.concatenate([np.zeros((rule.offset, *tensor.shape[1:]), tensor.dtype), tensor])
    return np.ascontiguousarray(tensor.T if rule.kind == "linear" else tensor)


# ---------------------------------------------------------------------------------------------
# Params: (block, relative path) <-> the model's leaves


def _keys(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", k)) for k in path)


def _split_path(keys: tuple[str, ...]) -> tuple[str, str | None, str]:
    """(prefix, "blocks" | "block_<i>" | None, path below the block or the whole path)."""
    for j, k in enumerate(keys):
        if k == "blocks" or re.fullmatch(r"block_\d+", k):
            return "/".join(keys[:j]), k, "/".join(keys[j + 1:])
    return "", None, "/".join(keys)


def _rule_key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def _index(rules_: list[Rule]) -> dict[str, tuple[Rule, int]]:
    return {o: (r, j) for r in rules_ for j, o in enumerate(r.ours)}


def read_params(hf_dir: str, arch: str, hf: dict, cfg: Config, mesh):
    """The params on `mesh`, each device's shard read from the safetensors files as a block of
    the one tensor (per layer) it comes from: no host holds a whole sharded tensor."""
    files = SafetensorsFiles(hf_dir)
    abstract = restore.abstract_params(cfg, mesh)
    rules_ = rules(arch, hf)
    by_ours = _index(rules_)
    leaves = {_keys(p): a for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
    # Each leaf's layers: a scanned stack holds num_layers, an unrolled block one.
    layout = {}
    for keys, a in leaves.items():
        prefix, block, rel = _split_path(keys)
        key = _rule_key(prefix, rel)
        if key not in by_ours:
            raise HFError(f"param {'/'.join(keys)} has no Hugging Face counterpart in {arch}")
        layers = range(a.shape[0]) if block == "blocks" else [int(block[6:])] if block else [None]
        layout[keys] = (key, layers, a.shape[1:] if block == "blocks" else a.shape, block == "blocks")
    shapes = {key: shape for key, _, shape, _ in layout.values()}
    wanted = {(key, i) for key, layers, _, _ in layout.values() for i in layers}
    for rule in rules_:  # every tensor present and of the right shape before any is read
        missing = [o for o in rule.ours if o not in shapes]
        if missing:
            raise HFError(f"tensor {rule.name} maps to {', '.join(missing)}, which this config's model does not have")
        want = _hf_shape(rule, [shapes[o] for o in rule.ours])
        for i in sorted({i for (k, i) in wanted if k in rule.ours}, key=lambda i: -1 if i is None else i):
            name = rule.name.format(i=i) if rule.per_layer else rule.name
            if files.shape(name) != want:
                raise HFError(f"tensor {name} has shape {list(files.shape(name))}, but config.json implies jaxllm "
                              f"{', '.join(f'{o} {list(shapes[o])}' for o in rule.ours)}")
    dtype = DTYPES[cfg.model.param_dtype]

    def load(path, target):
        key, layers, shape, stacked = layout[_keys(path)]
        rule, part = by_ours[key]
        parts = [shapes[o] for o in rule.ours]

        def shard(index):
            index = _normalise(index, target.shape)
            out = aligned_empty(tuple(_length(s) for s in index), dtype)
            ids, inner = (layers[index[0]], index[1:]) if stacked else (layers, index)
            for k, i in enumerate(ids):
                name = rule.name.format(i=i) if rule.per_layer else rule.name
                block = _read_block(files, name, rule, parts, part, inner).astype(np.float32)
                if stacked:
                    out[k] = block
                else:
                    out[...] = block
            return out

        return jax.make_array_from_callback(target.shape, target.sharding, shard)

    return jax.tree_util.tree_map_with_path(load, abstract)


@workdir_lock.holding("workdir")
def import_checkpoint(hf_dir: str, workdir: str, base: Config = Config()) -> Config:
    """As interop.hf.import_checkpoint, for the architectures of this module."""
    if ckpt.holds_checkpoints(workdir):
        raise HFError(f"{workdir} already holds checkpoints; import into a new --workdir")
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf = json.load(f)
    arch = architecture_of(hf)
    if arch is None:
        raise HFError(f"config.json architectures={hf.get('architectures')}: this importer reads "
                      f"{', '.join(ARCHITECTURES)}")
    has_tokenizer = os.path.exists(os.path.join(hf_dir, "tokenizer.json"))
    workdir = os.path.abspath(workdir)
    cfg = dataclasses.replace(config_from_hf(hf, workdir if has_tokenizer else "bytes", base), workdir=workdir)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_divisibility(restore.inference_config(cfg, mesh), mesh)
    copy_tokenizer(hf_dir, workdir)  # before reading params: the tokenizer is part of the config
    params = read_params(hf_dir, arch, hf, cfg, mesh)
    save_imported_run(workdir, hf_dir, cfg, params)
    return cfg


def hf_architecture(cfg: Config) -> str | None:
    """The architecture of this module that represents `cfg`, None if it is not one of them (the
    Llama family's exporter may take it), or an error saying what does not fit."""
    m = cfg.model
    if cfg.family == "causal_lm" and m.position_kind == "learned" and m.norm_kind == "layernorm":
        problems = [n for n, bad in (("norm_placement", m.norm_placement != "pre"),
                                     ("mlp_kind", m.mlp_kind not in ("gelu", "gelu_tanh")),
                                     ("qkv_bias/attn_out_bias/mlp_bias", not (m.qkv_bias and m.attn_out_bias and m.mlp_bias)),
                                     ("num_kv_heads", m.kv_heads != m.num_heads), ("tie_embeddings", not m.tie_embeddings),
                                     ("moe", m.moe.num_experts > 0)) if bad]
        if problems:
            raise HFError(f"this causal LM is not a GPT-2: model.{', model.'.join(problems)} differ(s)")
        return "GPT2LMHeadModel"
    encoder = cfg.family == "masked_lm" or (cfg.family == "classifier" and cfg.classifier.backbone == "encoder")
    if not encoder:
        return None
    problems = [n for n, bad in (("norm_placement", m.norm_placement != "post"), ("norm_kind", m.norm_kind != "layernorm"),
                                 ("position_kind", m.position_kind != "learned"), ("embed_norm", not m.embed_norm),
                                 ("num_kv_heads", m.kv_heads != m.num_heads), ("mlp_kind", m.mlp_kind not in ("gelu", "gelu_tanh")),
                                 ("moe", m.moe.num_experts > 0)) if bad]
    if cfg.family == "classifier":
        c = cfg.classifier
        problems += [n for n, bad in (("classifier.pooling", c.pooling != "first"), ("classifier.pooler", not c.pooler),
                                      ("classifier.score_bias", not c.score_bias)) if bad]
    if problems:
        raise HFError(f"this encoder is not a BERT: {', '.join(problems)} differ(s) from BERT's")
    tok = tokenizer_lib.load(m.tokenizer)
    # RoBERTa's table starts at padding_idx + 1; its tokenizer has <s> as [CLS] and BOS.
    roberta = tok.cls_id is not None and tok.cls_id == tok.bos_id and m.tokenizer != "bytes"
    if cfg.family == "classifier":
        return "RobertaForSequenceClassification" if roberta else "BertForSequenceClassification"
    return "RobertaForMaskedLM" if roberta else "BertForMaskedLM"


def hf_config(cfg: Config, arch: str, tok, dtype: str) -> dict:
    m = cfg.model
    act = {v: k for k, v in ACTIVATIONS.items() if k != "gelu_pytorch_tanh"}[m.mlp_kind]
    common = {"architectures": [arch], "model_type": MODEL_TYPES[arch], "vocab_size": m.vocab_size,
              "tie_word_embeddings": True, "dtype": dtype, "torch_dtype": dtype}
    if arch == "GPT2LMHeadModel":
        return {**common, "n_embd": m.d_model, "n_layer": m.num_layers, "n_head": m.num_heads, "n_inner": m.mlp_dim,
                "n_positions": m.max_positions, "activation_function": act, "layer_norm_epsilon": m.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    roberta = MODEL_TYPES[arch] == "roberta"
    pad = tok.pad_id if tok.pad_id is not None else (1 if roberta else 0)
    out = {**common, "hidden_size": m.d_model, "num_hidden_layers": m.num_layers, "num_attention_heads": m.num_heads,
           "intermediate_size": m.mlp_dim, "hidden_act": act, "layer_norm_eps": m.norm_eps,
           "max_position_embeddings": m.max_positions + (pad + 1 if roberta else 0), "type_vocab_size": m.type_vocab_size,
           "position_embedding_type": "absolute", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
           "pad_token_id": pad}
    if roberta:
        out.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    if arch in CLASSIFIERS:
        names = cfg.data.classes or tuple(f"LABEL_{i}" for i in range(cfg.classifier.num_classes))
        out.update(num_labels=cfg.classifier.num_classes, id2label={str(i): n for i, n in enumerate(names)},
                   label2id={n: i for i, n in enumerate(names)})
    return out


@workdir_lock.holding("out")
def export_checkpoint(workdir: str, out: str, dtype: str = "float32", step: int | None = None) -> dict:
    """`workdir`'s params as a Hugging Face checkpoint directory `out` (one model.safetensors,
    config.json, the tokenizer files)."""
    cfg, params, step = restore.load_params(workdir, return_step=True, step=step)
    if any(getattr(x, "dtype", None) == np.int8 for x in jax.tree.leaves(params)):
        raise HFError(f"{workdir} holds an int8-quantized checkpoint; export the float run it came from")
    arch = hf_architecture(cfg)
    if arch is None:
        raise HFError(f"family={cfg.family} with this model is not a BERT, RoBERTa or GPT-2")
    if dtype not in DTYPES:
        raise HFError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if os.path.exists(os.path.join(out, "config.json")):
        raise HFError(f"{out} already holds a checkpoint (config.json); choose a new --out")
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    roberta_pad = (tok.pad_id if tok.pad_id is not None else 1) + 1
    hf = {"model_type": MODEL_TYPES[arch], "pad_token_id": roberta_pad - 1}
    host: dict[tuple, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        prefix, block, rel = _split_path(_keys(path))
        array = np.asarray(jax.device_get(leaf), np.float32)
        if block == "blocks":
            host.update({(_rule_key(prefix, rel), i): array[i] for i in range(array.shape[0])})
        else:
            host[(_rule_key(prefix, rel), int(block[6:]) if block else None)] = array
    tensors = {}
    for rule in rules(arch, hf):
        layers = range(cfg.model.num_layers) if rule.per_layer else [None]
        for i in layers:
            name = rule.name.format(i=i) if rule.per_layer else rule.name
            tensors[name] = _to_theirs(rule, [host[(o, i)] for o in rule.ours]).astype(DTYPES[dtype])
    os.makedirs(out, exist_ok=True)
    if jax.process_index() == 0:
        save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(hf_config(cfg, arch, tok, dtype), f, indent=2)
        if cfg.model.tokenizer != "bytes":
            source = os.path.dirname(tok.name)
            for name in TOKENIZER_FILES:
                if os.path.exists(os.path.join(source, name)):
                    shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
    return {"architecture": arch, "step": step, "shards": 1, "total_size": sum(t.nbytes for t in tensors.values())}

