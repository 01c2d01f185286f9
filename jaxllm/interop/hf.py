"""Hugging Face checkpoints in and out (Llama, Mistral, Qwen2, Mixtral): safetensors files, shards
and their index, config.json and the tokenizer.

Import builds the target param tree with `jax.eval_shape` on the destination mesh and reads every
array with `jax.make_array_from_callback`: each device's shard is read from the safetensors files
as a slice of the one Hugging Face tensor it comes from, one tensor at a time, so no host holds the
whole model and a process of a multi-host job reads only what its devices hold. Export writes one
tensor at a time the other way.

Layouts: a Hugging Face linear weight is [out, in]; a jaxllm kernel is [in..., out...] (q [D, H, K],
o [H, K, D], gate [D, F], experts [E, D, F], router [D, E]), so kernel = W.T reshaped. Both use
rotate-half RoPE over each head's dimensions, so q and k need no permutation. Scanned models stack
the layers on a leading axis (and experts on the next), which this module reads layer by layer.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import shutil
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxllm import restore, sharding
from jaxllm import config as config_lib
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.config import Config
from jaxllm.interop.hf_config import HFError, hf_architecture, hf_config, model_config
from jaxllm.training import checkpoint as ckpt

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How one jaxllm param comes from Hugging Face tensors. `name(layer, expert)` is the tensor's
    name; `stack` the leading jaxllm axes that index separate tensors ("layer", "expert"); `kernel`
    the number of input axes when the param is W.T reshaped (0: the tensor reshaped as it is)."""

    name: Callable[..., str]
    stack: tuple[str, ...] = ()
    kernel: int = 0
    flat: bool = False  # stored flattened (a bias [H·K] for jaxllm's [H, K])


def _layer_maps(arch: str) -> dict[str, TensorMap]:
    """Maps of the params inside one block, by their path below the block."""
    attn = "model.layers.{i}.self_attn.{p}_proj"
    maps = {
        **{f"attn/{p}": TensorMap(lambda i, p=p: attn.format(i=i, p=p) + ".weight", kernel=1) for p in "qkv"},
        "attn/o": TensorMap(lambda i: attn.format(i=i, p="o") + ".weight", kernel=2),
        "attn_norm/scale": TensorMap(lambda i: f"model.layers.{i}.input_layernorm.weight"),
        "mlp_norm/scale": TensorMap(lambda i: f"model.layers.{i}.post_attention_layernorm.weight"),
    }
    if arch == "Qwen2ForCausalLM":
        maps.update({f"attn/{p}_bias": TensorMap(lambda i, p=p: attn.format(i=i, p=p) + ".bias", flat=True)
                     for p in "qkv"})
    if arch == "MixtralForCausalLM":
        moe = "model.layers.{i}.block_sparse_moe"
        maps["mlp/router"] = TensorMap(lambda i: moe.format(i=i) + ".gate.weight", kernel=1)
        for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            maps[f"mlp/{ours}"] = TensorMap(
                lambda i, e, t=theirs: moe.format(i=i) + f".experts.{e}.{t}.weight", ("expert",), kernel=1)
    else:
        for p in ("gate", "up", "down"):
            maps[f"mlp/{p}"] = TensorMap(lambda i, p=p: f"model.layers.{i}.mlp.{p}_proj.weight", kernel=1)
    return maps


def param_maps(arch: str, params) -> dict[tuple, TensorMap]:
    """{param path: TensorMap} for every leaf of `params` (abstract or real; scanned or not)."""
    top = {"embed/embedding": TensorMap(lambda: "model.embed_tokens.weight"),
           "final_norm/scale": TensorMap(lambda: "model.norm.weight"),
           "unembed": TensorMap(lambda: "lm_head.weight", kernel=1)}
    layer = _layer_maps(arch)
    maps = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        joined = "/".join(keys)
        if joined in top:
            maps[keys] = top[joined]
        elif keys[0] == "blocks" and "/".join(keys[1:]) in layer:
            m = layer["/".join(keys[1:])]
            maps[keys] = dataclasses.replace(m, stack=("layer", *m.stack))
        elif re.fullmatch(r"block_\d+", keys[0]) and "/".join(keys[1:]) in layer:
            m, i = layer["/".join(keys[1:])], int(keys[0][len("block_"):])
            maps[keys] = dataclasses.replace(m, name=lambda *idx, m=m, i=i: m.name(i, *idx))
        else:
            raise HFError(f"param {joined} has no Hugging Face counterpart in {arch}")
    return maps


# ---------------------------------------------------------------------------------------------
# Reading


class SafetensorsFiles:
    """The tensors of a checkpoint directory: model.safetensors, or the shards its
    model.safetensors.index.json lists. Files are opened lazily and reads are slices."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                self.where = dict(json.load(f)["weight_map"])
        elif os.path.exists(single):
            with safe_open(single, framework="numpy") as f:
                self.where = {name: "model.safetensors" for name in f.keys()}
        else:
            raise HFError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
        for file in sorted(set(self.where.values())):
            if not os.path.exists(os.path.join(directory, file)):
                raise HFError(f"shard {file} listed in {directory}/model.safetensors.index.json is missing")
    def _open(self, name: str):
        # Opened per read: a file left open keeps every page read so far mapped into the process,
        # so an import's resident memory would grow by the checkpoint's size on top of the params.
        if name not in self.where:
            raise HFError(f"tensor {name} is not in the checkpoint {self.directory}")
        return safe_open(os.path.join(self.directory, self.where[name]), framework="numpy")

    def shape(self, name: str) -> tuple[int, ...]:
        with self._open(name) as f:
            return tuple(f.get_slice(name).get_shape())

    def read(self, name: str, index=None) -> np.ndarray:
        with self._open(name) as f:
            s = f.get_slice(name)
            return s[index] if index is not None else s[:]


def _group_slice(slices, shape):
    """For axes of `shape` flattened into one (row-major), the flat range covering `slices` and the
    slices to apply to the remaining axes once that range is reshaped (leading axis, *rest)."""
    rest = math.prod(shape[1:])
    lead = slices[0]
    return slice(lead.start * rest, lead.stop * rest), (slice(None), *slices[1:])


def _length(s: slice) -> int:
    return s.stop - s.start


def _normalise(index, shape):
    return tuple(slice(*s.indices(d)) for s, d in zip(index, shape))


def _read_block(files: SafetensorsFiles, name: str, m: TensorMap, shape, index) -> np.ndarray:
    """The block `index` of the jaxllm tensor of `shape` that tensor `name` becomes."""
    if m.kernel:
        in_shape, out_shape = shape[:m.kernel], shape[m.kernel:]
        rows, rest_out = _group_slice(index[m.kernel:], out_shape)
        cols, rest_in = _group_slice(index[:m.kernel], in_shape)
        block = _transposed(files.read(name, (rows, cols)))  # [flat in, flat out]
        block = block.reshape(_length(index[0]), *in_shape[1:], _length(index[m.kernel]), *out_shape[1:])
        return block[(*rest_in, *rest_out)]
    if not m.flat:
        return files.read(name, index)
    flat, rest = _group_slice(index, shape)
    return files.read(name, (flat,)).reshape(_length(index[0]), *shape[1:])[rest]


def _transposed(x: np.ndarray, tile: int = 256) -> np.ndarray:
    """x.T of a 2-D array, copied tile by tile: numpy's plain transposing copy of a large matrix
    misses the cache on every element (2.4x slower for an [8192, 2048] bfloat16 kernel)."""
    raw = x.view(np.dtype(f"u{x.dtype.itemsize}"))
    out = np.empty(raw.shape[::-1], raw.dtype)
    for i in range(0, raw.shape[0], tile):
        for j in range(0, raw.shape[1], tile):
            out[j:j + tile, i:i + tile] = raw[i:i + tile, j:j + tile].T
    return out.view(x.dtype)


def _expected_hf_shape(m: TensorMap, shape) -> tuple[int, ...]:
    if m.kernel:
        return (math.prod(shape[m.kernel:]), math.prod(shape[:m.kernel]))
    return (math.prod(shape),) if m.flat else tuple(shape)


def _check_shapes(files: SafetensorsFiles, maps, abstract) -> None:
    leaves = {tuple(str(getattr(k, "key", k)) for k in p): a for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
    for path, m in maps.items():
        shape = leaves[path].shape
        stacked, tensor_shape = shape[:len(m.stack)], shape[len(m.stack):]
        want = _expected_hf_shape(m, tensor_shape)
        for idx in np.ndindex(*stacked) if stacked else [()]:
            name = m.name(*idx)
            got = files.shape(name)
            if got != want:
                raise HFError(f"tensor {name} has shape {list(got)}, but config.json implies {list(want)} "
                              f"(jaxllm {'/'.join(path)} {list(tensor_shape)})")


def read_params(hf_dir: str, cfg: Config, mesh: jax.sharding.Mesh):
    """The params of the Hugging Face checkpoint in `hf_dir`, read onto `mesh` in `cfg`'s layout
    (and model.param_dtype)."""
    with open(os.path.join(hf_dir, "config.json")) as f:
        arch = hf_architecture(model_config(json.load(f)))
    files = SafetensorsFiles(hf_dir)
    abstract = restore.abstract_params(cfg, mesh)
    maps = param_maps(arch, abstract)
    _check_shapes(files, maps, abstract)
    dtype = DTYPES[cfg.model.param_dtype]

    def load(path, target):
        m = maps[tuple(str(getattr(k, "key", k)) for k in path)]
        n = len(m.stack)

        def shard(index):
            # One Hugging Face tensor per (layer, expert) in the shard's stacked range.
            index = _normalise(index, target.shape)
            stacked = [range(s.start, s.stop) for s in index[:n]]
            out = np.empty(tuple(_length(s) for s in index), dtype)
            for k, ids in enumerate(itertools.product(*stacked)):
                out.reshape(-1, *out.shape[n:])[k] = _read_block(files, m.name(*ids), m, target.shape[n:], index[n:])
            return out

        return jax.make_array_from_callback(target.shape, target.sharding, shard)

    return jax.tree_util.tree_map_with_path(load, abstract)


def import_checkpoint(hf_dir: str, workdir: str, base: Config = Config()) -> Config:
    """Writes a jaxllm run directory for the Hugging Face checkpoint in `hf_dir`: config.json, the
    tokenizer files and a params-only checkpoint at step 0 that every tool restores. `base` gives
    everything but the architecture (mesh, layout, training settings)."""
    if ckpt.holds_checkpoints(workdir):
        raise HFError(f"{workdir} already holds checkpoints; import into a new --workdir")
    config_file = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_file):
        raise HFError(f"{hf_dir} has no config.json: not a Hugging Face checkpoint directory")
    with open(config_file) as f:
        hf = json.load(f)
    has_tokenizer = os.path.exists(os.path.join(hf_dir, "tokenizer.json"))
    workdir = os.path.abspath(workdir)
    model = model_config(hf, tokenizer=workdir if has_tokenizer else "bytes", base=base.model)
    cfg = dataclasses.replace(base, workdir=workdir, model=model)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_divisibility(restore.inference_config(cfg, mesh), mesh)
    params = read_params(hf_dir, cfg, mesh)
    os.makedirs(workdir, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(workdir, name))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(cfg))
    writer = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir))
    try:
        writer.save(0, {"params": params}, {"data_step": 0, "config": config_lib.to_dict(cfg),
                                             "imported_from": os.path.abspath(hf_dir)})
    finally:
        writer.close()
    return cfg


# ---------------------------------------------------------------------------------------------
# Writing


def _hf_tensors(arch: str, params, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every Hugging Face tensor of `params`, gathered one at a time."""
    maps = param_maps(arch, params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        m = maps[tuple(str(getattr(k, "key", k)) for k in path)]
        n = len(m.stack)
        tensor_shape = leaf.shape[n:]
        for idx in np.ndindex(*leaf.shape[:n]) if n else [()]:
            block = np.asarray(jax.device_get(leaf[idx] if n else leaf), np.float32)
            if m.kernel:
                block = block.reshape(math.prod(tensor_shape[:m.kernel]), -1).T
            elif m.flat:
                block = block.reshape(-1)
            yield m.name(*idx), np.ascontiguousarray(block).astype(dtype)


def export_checkpoint(workdir: str, out: str, dtype: str = "float32", max_shard_bytes: int = 2 << 30,
                      step: int | None = None) -> dict:
    """Writes `workdir`'s params (checkpoint `step`, default the latest) as a Hugging Face checkpoint
    directory `out`: safetensors shards of at most `max_shard_bytes`, their index, config.json
    and the tokenizer files. Returns the index's metadata."""
    cfg, params, step = restore.load_params(workdir, return_step=True, step=step)
    if any(getattr(x, "dtype", None) == np.int8 for x in jax.tree.leaves(params)):
        raise HFError(f"{workdir} holds an int8-quantized checkpoint; export the float run it came from")
    arch = hf_architecture(cfg.model)
    if dtype not in DTYPES:
        raise HFError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if os.path.exists(os.path.join(out, "config.json")):
        raise HFError(f"{out} already holds a checkpoint (config.json); choose a new --out")
    os.makedirs(out, exist_ok=True)
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    shards, current, size, total = [], {}, 0, 0
    for name, array in _hf_tensors(arch, params, DTYPES[dtype]):
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
        total += array.nbytes
        if size >= max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        if jax.process_index() == 0:
            save_file(shard, os.path.join(out, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    metadata = {"total_size": total}
    if jax.process_index() == 0:
        if len(shards) > 1:
            with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": metadata, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(hf_config(cfg.model, special, dtype), f, indent=2)
        if cfg.model.tokenizer != "bytes":
            source = os.path.dirname(tok.name)
            for name in TOKENIZER_FILES:
                if os.path.exists(os.path.join(source, name)):
                    shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
    return {"architecture": arch, "step": step, "shards": len(shards), **metadata}
