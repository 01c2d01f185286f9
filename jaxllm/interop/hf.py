"""Hugging Face checkpoints in and out (Llama, Mistral, Qwen2, Mixtral, Qwen3, Qwen3-MoE, Gemma 2,
Gemma 3, DeepSeek-V3): safetensors files, shards and their index, config.json and the tokenizer.

Import builds the target param tree with `jax.eval_shape` on the destination mesh and reads every
array with `jax.make_array_from_callback`: each device's shard is read from the safetensors files
as a slice of the one Hugging Face tensor it comes from, one tensor at a time, so no host holds the
whole model and a process of a multi-host job reads only what its devices hold. A shard's rows are
mapped straight from the file and copied (transposed, for kernels) into a 64-byte-aligned buffer
that a CPU device then holds without another copy. Export writes one tensor at a time the
other way.

Layouts: a Hugging Face linear weight is [out, in]; a jaxllm kernel is [in..., out...] (q [D, H, K],
o [H, K, D], gate [D, F], experts [E, D, F], router [D, E]), so kernel = W.T reshaped. Both use
rotate-half RoPE over each head's dimensions, so q and k need no permutation, except DeepSeek-V3's
RoPE rows, stored as interleaved pairs (`rope_rows`). Scanned models stack
the layers on a leading axis (and experts on the next), which this module reads layer by layer.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import mmap
import os
import re
import shutil
import sys
from typing import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxllm import restore, sharding
from jaxllm import config as config_lib
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.compression import quantize
from jaxllm.config import Config
from jaxllm.interop.hf_config import (DEEPSEEK, GEMMA, HFError, hf_architecture, hf_config, interleaved_rope_dims,
                                      model_config, read_config)
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import workdir_lock

# chat_template.jinja: where transformers >= 4.50 saves a chat template (older ones keep it in
# tokenizer_config.json).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# The source's config.json, kept in an imported run directory: export reads the special token ids
# and max_position_embeddings the run's own config does not hold.
SOURCE_CONFIG = "hf_source_config.json"
# The source's generation_config.json (eos lists, default sampling settings), merged into the
# export's own (transformers' generate and vLLM read it).
SOURCE_GENERATION_CONFIG = "hf_source_generation_config.json"
GENERATION_CONFIG = "generation_config.json"
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
    # The last rope_tail entries of each output row block (the kernel's last axis) are interleaved
    # RoPE pairs in the file (DeepSeek-V3); see `rope_rows`.
    rope_tail: int = 0


def rope_rows(out_shape, tail: int) -> np.ndarray:
    """The Hugging Face row of each jaxllm output row (flat over `out_shape`) of a projection whose
    last `tail` entries of each out_shape[-1] block are RoPE pairs (x0, x1), (x2, x3), ... in the
    file: jaxllm holds them as evens then odds, the rotate-half layout its RoPE rotates (HF's
    interleaved rotation of the pairs equals rotate-half of that permutation, output included)."""
    width = out_shape[-1]
    within = np.arange(width)
    within[width - tail:] = width - tail + np.concatenate([np.arange(0, tail, 2), np.arange(1, tail, 2)])
    return (np.arange(math.prod(out_shape) // width)[:, None] * width + within).reshape(-1)


def _layer_maps(arch: str, moe: bool, rope_tail: int = 0) -> dict[str, TensorMap]:
    """Maps of the params inside one block (an MoE block if `moe`), by their path below the block;
    `rope_tail`: DeepSeek's interleaved RoPE dimensions (hf_config.interleaved_rope_dims)."""
    attn = "model.layers.{i}.self_attn.{p}_proj"
    layer = "model.layers.{i}."
    norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    if arch in GEMMA:  # sandwich norms
        norms = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
    maps = {
        **{f"attn/{p}": TensorMap(lambda i, p=p: attn.format(i=i, p=p) + ".weight", kernel=1) for p in "qkv"},
        "attn/o": TensorMap(lambda i: attn.format(i=i, p="o") + ".weight", kernel=2),
        **{f"{ours}/scale": TensorMap(lambda i, t=theirs: layer.format(i=i) + t + ".weight") for ours, theirs in norms.items()},
        # q/k norms (Qwen3, Gemma 3); present in the params only when the model has them
        **{f"attn/{p}_norm/scale": TensorMap(lambda i, p=p: layer.format(i=i) + f"self_attn.{p}_norm.weight") for p in "qk"},
    }
    if arch == "Qwen2ForCausalLM":
        maps.update({f"attn/{p}_bias": TensorMap(lambda i, p=p: attn.format(i=i, p=p) + ".bias", flat=True)
                     for p in "qkv"})
    if arch == DEEPSEEK:  # multi-head latent attention (layers/mla.py)
        proj = lambda p, **kw: TensorMap(lambda i: attn.format(i=i, p=p) + ".weight", kernel=1, **kw)  # noqa: E731
        maps.update({"attn/q_a": proj("q_a"), "attn/q_b": proj("q_b", rope_tail=rope_tail),
                     "attn/q": proj("q", rope_tail=rope_tail), "attn/kv_a": proj("kv_a", rope_tail=rope_tail),
                     "attn/kv_b": proj("kv_b"),
                     **{f"attn/{p}_norm/scale": TensorMap(lambda i, p=p: layer.format(i=i) + f"self_attn.{p}_a_layernorm.weight")
                        for p in ("q", "kv")}})
        maps["attn/kv_a"] = dataclasses.replace(maps["attn/kv_a"], name=lambda i: attn.format(i=i, p="kv_a") + "_with_mqa.weight")
    if moe and arch == DEEPSEEK:  # routed experts as Qwen3-MoE's (below), plus the correction bias and shared experts
        maps["mlp/router_bias"] = TensorMap(lambda i: layer.format(i=i) + "mlp.gate.e_score_correction_bias")
        for p in ("gate", "up", "down"):
            maps[f"mlp/shared/{p}"] = TensorMap(
                lambda i, p=p: layer.format(i=i) + f"mlp.shared_experts.{p}_proj.weight", kernel=1)
    if moe and arch == "MixtralForCausalLM":
        moe_prefix = "model.layers.{i}.block_sparse_moe"
        maps["mlp/router"] = TensorMap(lambda i: moe_prefix.format(i=i) + ".gate.weight", kernel=1)
        for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
            maps[f"mlp/{ours}"] = TensorMap(
                lambda i, e, t=theirs: moe_prefix.format(i=i) + f".experts.{e}.{t}.weight", ("expert",), kernel=1)
    elif moe:  # Qwen3-MoE
        maps["mlp/router"] = TensorMap(lambda i: layer.format(i=i) + "mlp.gate.weight", kernel=1)
        for p in ("gate", "up", "down"):
            maps[f"mlp/{p}"] = TensorMap(
                lambda i, e, p=p: layer.format(i=i) + f"mlp.experts.{e}.{p}_proj.weight", ("expert",), kernel=1)
    else:
        for p in ("gate", "up", "down"):
            maps[f"mlp/{p}"] = TensorMap(lambda i, p=p: f"model.layers.{i}.mlp.{p}_proj.weight", kernel=1)
    return maps


def param_maps(arch: str, params, rope_tail: int = 0) -> dict[tuple, TensorMap]:
    """{param path: TensorMap} for every leaf of `params` (abstract or real; scanned or not, in
    groups of blocks or one by one; a scanned stack after unscanned dense blocks block_0 ..)."""
    top = {"embed/embedding": TensorMap(lambda: "model.embed_tokens.weight"),
           "final_norm/scale": TensorMap(lambda: "model.norm.weight"),
           "unembed": TensorMap(lambda: "lm_head.weight", kernel=1)}
    paths = [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    # A block is MoE when it has a router; scanned groups hold blocks/block_j, k of them.
    moe_blocks = {p[:p.index("mlp")] for p in paths if "mlp" in p and p[p.index("mlp") + 1:] == ("router",)}
    group = len({p[1] for p in paths if p[0] == "blocks" and re.fullmatch(r"block_\d+", p[1])})
    # The scanned stack's first layer: after the unscanned dense prefix (model.moe.first_dense).
    first = len({p[0] for p in paths if re.fullmatch(r"block_\d+", p[0])}) if any(p[0] == "blocks" for p in paths) else 0
    maps = {}
    for keys in paths:
        joined = "/".join(keys)
        if joined in top:
            maps[keys] = top[joined]
            continue
        if keys[0] == "blocks" and group:  # blocks/block_j: position j of each group of `group` blocks
            j, prefix = int(keys[1][len("block_"):]), keys[:2]
            layer = _layer_maps(arch, prefix in moe_blocks, rope_tail)
            if "/".join(keys[2:]) in layer:
                m = layer["/".join(keys[2:])]
                maps[keys] = dataclasses.replace(m, stack=("layer", *m.stack),
                                                 name=lambda g, *idx, m=m, j=j: m.name(first + g * group + j, *idx))
                continue
        elif keys[0] == "blocks":
            m = _layer_maps(arch, ("blocks",) in moe_blocks, rope_tail).get("/".join(keys[1:]))
            if m is not None:
                maps[keys] = dataclasses.replace(m, stack=("layer", *m.stack),
                                                 name=lambda i, *idx, m=m: m.name(first + i, *idx))
                continue
        elif re.fullmatch(r"block_\d+", keys[0]):
            m, i = _layer_maps(arch, keys[:1] in moe_blocks, rope_tail).get("/".join(keys[1:])), int(keys[0][len("block_"):])
            if m is not None:
                maps[keys] = dataclasses.replace(m, name=lambda *idx, m=m, i=i: m.name(i, *idx))
                continue
        raise HFError(f"param {joined} has no Hugging Face counterpart in {arch}")
    return maps


# ---------------------------------------------------------------------------------------------
# Reading


# safetensors dtype names -> numpy dtypes (the file format is little-endian).
ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
             "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
             "U8": np.dtype("u1"), "BOOL": np.dtype("?")}
_ALIGN = 64  # XLA's CPU client takes a host buffer without copying it when it is this aligned
_MAPPED_BYTES = 1 << 20  # buffers this large are fresh mapped pages (see aligned_empty)


@dataclasses.dataclass(frozen=True)
class _Entry:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets of the tensor's data in `file`
    stop: int


def _header(path: str) -> dict[str, _Entry]:
    """The tensors of one safetensors file, from its header: an 8-byte little-endian length, then
    that many bytes of JSON {name: {dtype, shape, data_offsets}} relative to the end of the header."""
    length = os.path.getsize(path)
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            if not 0 < size <= length - 8:
                raise ValueError(f"a header of {size} bytes in a file of {length}")
            header = json.loads(f.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    info["dtype"], info["shape"], info["data_offsets"]  # noqa: B018  (present)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in ST_DTYPES:
            raise HFError(f"tensor {name} in {path} has dtype {info['dtype']}, which jaxllm does not read")
        begin, end = info["data_offsets"]
        if 8 + size + end > length:  # reading a mapping past the end of a file would be a SIGBUS
            raise HFError(f"{path} is truncated: tensor {name} ends at byte {8 + size + end} of {length}")
        entries[name] = _Entry(path, ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + size + begin, 8 + size + end)
    return entries


def aligned_empty(shape, dtype) -> np.ndarray:
    """np.empty with its data _ALIGN-byte aligned, so that jax.device_put onto a CPU device uses
    the buffer as it is (numpy aligns to 16 bytes, which XLA copies). A large one is fresh pages
    mapped at once (MAP_POPULATE): page faults in a transposing copy's scattered write order cost
    more than the copy (benchmarks/README.md, "Hugging Face import")."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes >= _MAPPED_BYTES and hasattr(mmap, "MAP_ANONYMOUS"):
        pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0))
        return np.frombuffer(pages, dtype, math.prod(shape)).reshape(shape)
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    offset = -raw.ctypes.data % _ALIGN
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)



class SafetensorsFiles:
    """The tensors of a checkpoint directory: model.safetensors, or the shards its
    model.safetensors.index.json lists. Headers are read once; a read maps only the bytes of the
    rows it asks for and unmaps them when the array it returns is dropped."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        single = os.path.join(directory, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                self.where = dict(json.load(f)["weight_map"])
        elif os.path.exists(single):
            self.where = {name: "model.safetensors" for name in _header(single)}
        else:
            raise HFError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
        self._entries: dict[str, _Entry] = {}
        for file in sorted(set(self.where.values())):
            path = os.path.join(directory, file)
            if not os.path.exists(path):
                raise HFError(f"shard {file} listed in {directory}/model.safetensors.index.json is missing")
            self._entries.update({n: e for n, e in _header(path).items() if self.where.get(n) == file})

    def _entry(self, name: str) -> _Entry:
        if name not in self._entries:
            raise HFError(f"tensor {name} is not in the checkpoint {self.directory}")
        return self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def rows(self, name: str, rows: slice | None = None) -> np.ndarray:
        """A read-only view of rows `rows` (along the first axis) of tensor `name`, straight on the
        file's pages: only those rows' bytes are mapped, and they are unmapped as soon as the view
        (and every array made from it) is dropped; a mapping left open would keep each page read
        so far resident in this process."""
        e = self._entry(name)
        shape = e.shape or (1,)
        start, stop, step = (rows if rows is not None else slice(None)).indices(shape[0])
        if step != 1:
            raise ValueError(f"rows of {name}: only a contiguous slice (step 1) maps, got {rows}")
        count = max(stop - start, 0)
        row_bytes = e.dtype.itemsize * math.prod(shape[1:])
        lo = e.start + start * row_bytes
        hi = lo + count * row_bytes
        if hi > e.stop:
            raise HFError(f"tensor {name} in {e.file} is shorter than its header says")
        if count == 0 or row_bytes == 0:
            return np.empty((count, *shape[1:]), e.dtype)
        base = lo - lo % mmap.ALLOCATIONGRANULARITY
        with open(e.file, "rb") as f:
            # MAP_POPULATE maps every page in one call instead of one page fault at a time.
            mapped = mmap.mmap(f.fileno(), hi - base, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                               prot=mmap.PROT_READ, offset=base)
        view = np.frombuffer(mapped, e.dtype, count * row_bytes // e.dtype.itemsize, lo - base)
        return view.reshape(count, *shape[1:]) if e.shape else view.reshape(())

    def read(self, name: str, index=None) -> np.ndarray:
        """Tensor `name` (or its block `index`, a tuple of slices), copied into memory."""
        if index is None or not index:
            return np.array(self.rows(name))
        if not all(isinstance(i, slice) for i in index):
            raise TypeError(f"read({name!r}, index): index must be a tuple of slices, got {index}")
        return np.array(self.rows(name, index[0])[(slice(None), *index[1:])])


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


def _whole(slices, shape) -> bool:
    return all(s.indices(d) == (0, d, 1) for s, d in zip(slices, shape))


def _read_block_into(files: SafetensorsFiles, name: str, m: TensorMap, shape, index, out: np.ndarray) -> None:
    """Writes into `out` the block `index` of the jaxllm tensor of `shape` that tensor `name`
    becomes, reading only the rows of the file that the block needs."""
    if m.kernel:
        in_shape, out_shape = shape[:m.kernel], shape[m.kernel:]
        rows, rest_out = _group_slice(index[m.kernel:], out_shape)
        cols, rest_in = _group_slice(index[:m.kernel], in_shape)
        if m.rope_tail:  # permuted rows: gathered from the whole tensor
            source = files.rows(name)[rope_rows(out_shape, m.rope_tail)[rows]][:, cols]
        else:
            source = files.rows(name, rows)[:, cols]  # [flat out, flat in], on the file's pages
        blocked = (_length(index[0]), *in_shape[1:], _length(index[m.kernel]), *out_shape[1:])
        if _whole(rest_in[1:], in_shape[1:]) and _whole(rest_out[1:], out_shape[1:]):
            into = out.view()
            into.shape = source.shape[::-1]  # a view or an error, never a copy the result would miss
            transpose_into(source, into)  # straight into place
        else:
            block = np.empty(source.shape[::-1], source.dtype)
            transpose_into(source, block)
            out[...] = block.reshape(blocked)[(*rest_in, *rest_out)]
    elif m.flat:
        flat, rest = _group_slice(index, shape)
        out[...] = files.rows(name, flat).reshape(_length(index[0]), *shape[1:])[rest]
    else:
        out[...] = files.rows(name, index[0])[(slice(None), *index[1:])]


def transpose_into(x: np.ndarray, out: np.ndarray) -> None:
    """out[...] = x.T for 2-D arrays. numpy's transposing copy misses the cache on nearly every
    element; 16- and 32-bit elements move here as 64-bit words holding 4x4 (2x2) blocks, transposed
    with shifts and masks (~3x faster than tiles; benchmarks/README.md, "Hugging Face import")."""
    size = x.dtype.itemsize
    lanes = 8 // size if size in (2, 4) else 0
    if (lanes and x.dtype == out.dtype and sys.byteorder == "little" and x.shape[0] % lanes == 0
            and x.shape[1] % lanes == 0 and x.strides[1] == size and out.flags.c_contiguous and x.size):
        bits = np.dtype(f"u{size}")
        words = x.view(bits).view(np.uint64)  # [R, C / lanes]
        columns = out.view(bits).view(np.uint64).reshape(x.shape[1] // lanes, lanes, x.shape[0] // lanes)
        step = _BLOCK_ROWS
        for r in range(0, x.shape[0], step):
            _transpose_words(words[r:r + step], columns[:, :, r // lanes:(r + step) // lanes], lanes)
        return
    if x.dtype == out.dtype:
        bits = np.dtype(f"u{size}")
        x, out = x.view(bits), out.view(bits)
    tile = 256
    for i in range(0, x.shape[0], tile):
        for j in range(0, x.shape[1], tile):
            out[j:j + tile, i:i + tile] = x[i:i + tile, j:j + tile].T


_BLOCK_ROWS = 128  # rows per block: the block's words and their transposes stay in cache
_M16 = np.uint64(0x0000FFFF0000FFFF), np.uint64(0xFFFF0000FFFF0000)
_M32 = np.uint64(0x00000000FFFFFFFF), np.uint64(0xFFFFFFFF00000000)
_S16, _S32 = np.uint64(16), np.uint64(32)


def _transpose_words(words: np.ndarray, columns: np.ndarray, lanes: int) -> None:
    """`words`: rows of 64-bit words, each `lanes` elements of a row (little-endian); writes
    columns[c, j, r] = the word of elements (lanes·r .. lanes·r + lanes - 1, lanes·c + j), that is
    word r of the transposed block's row lanes·c + j."""
    rows = [words[i::lanes] for i in range(lanes)]
    if lanes == 4:  # swap 16-bit lanes between rows 0-1 and 2-3, then 32-bit halves between 01 and 23
        even, odd = _M16
        r0, r1, r2, r3 = rows
        t0, t1 = (r0 & even) | ((r1 << _S16) & odd), ((r0 >> _S16) & even) | (r1 & odd)
        t2, t3 = (r2 & even) | ((r3 << _S16) & odd), ((r2 >> _S16) & even) | (r3 & odd)
        rows = [t0, t1, t2, t3]
        pairs = ((0, 2, 0), (1, 3, 1), (0, 2, 2), (1, 3, 3))
    else:
        pairs = ((0, 1, 0), (0, 1, 1))
    low, high = _M32
    for a, b, j in pairs:
        if j < lanes // 2:
            word = (rows[a] & low) | (rows[b] << _S32)
        else:
            word = (rows[a] >> _S32) | (rows[b] & high)
        columns[:, j, :] = word.T


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
    hf = read_config(os.path.join(hf_dir, "config.json"))
    arch = hf_architecture(model_config(hf))
    files = SafetensorsFiles(hf_dir)
    abstract = restore.abstract_params(cfg, mesh)
    maps = param_maps(arch, abstract, interleaved_rope_dims(hf))
    _check_shapes(files, maps, abstract)
    dtype = DTYPES[cfg.model.param_dtype]

    def load(path, target):
        m = maps[tuple(str(getattr(k, "key", k)) for k in path)]
        n = len(m.stack)

        def shard(index):
            # One Hugging Face tensor per (layer, expert) in the shard's stacked range, each written
            # into its place in the shard (aligned, so that placing it on a CPU device copies nothing).
            index = _normalise(index, target.shape)
            stacked = [range(s.start, s.stop) for s in index[:n]]
            out = aligned_empty(tuple(_length(s) for s in index), dtype)
            layers = out.reshape(-1, *out.shape[n:])
            for k, ids in enumerate(itertools.product(*stacked)):
                _read_block_into(files, m.name(*ids), m, target.shape[n:], index[n:], layers[k])
            return out

        return jax.make_array_from_callback(target.shape, target.sharding, shard)

    return jax.tree_util.tree_map_with_path(load, abstract)


@workdir_lock.holding("workdir")
def import_checkpoint(hf_dir: str, workdir: str, base: Config = Config()) -> Config:
    """Writes a jaxllm run directory for the Hugging Face checkpoint in `hf_dir`: config.json, the
    tokenizer files and a params-only checkpoint at step 0 that every tool restores. `base` gives
    everything but the architecture (mesh, layout, training settings)."""
    if ckpt.holds_checkpoints(workdir):
        raise HFError(f"{workdir} already holds checkpoints; import into a new --workdir")
    config_file = os.path.join(hf_dir, "config.json")
    if not os.path.exists(config_file):
        raise HFError(f"{hf_dir} has no config.json: not a Hugging Face checkpoint directory")
    hf = read_config(config_file)
    has_tokenizer = os.path.exists(os.path.join(hf_dir, "tokenizer.json"))
    workdir = os.path.abspath(workdir)
    model = model_config(hf, tokenizer=workdir if has_tokenizer else "bytes", base=base.model)
    cfg = dataclasses.replace(base, workdir=workdir, model=model)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.check_divisibility(restore.inference_config(cfg, mesh), mesh)
    params = read_params(hf_dir, cfg, mesh)
    copy_tokenizer(hf_dir, workdir)
    if jax.process_index() == 0:
        shutil.copyfile(config_file, os.path.join(workdir, SOURCE_CONFIG))
        if os.path.exists(os.path.join(hf_dir, GENERATION_CONFIG)):
            shutil.copyfile(os.path.join(hf_dir, GENERATION_CONFIG), os.path.join(workdir, SOURCE_GENERATION_CONFIG))
    save_imported_run(workdir, hf_dir, cfg, params)
    return cfg


def copy_tokenizer(hf_dir: str, workdir: str) -> None:
    """The checkpoint's tokenizer files into the run directory (made if missing)."""
    os.makedirs(workdir, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(workdir, name))


def save_imported_run(workdir: str, hf_dir: str, cfg: Config, params) -> None:
    """An imported model as a run directory: its config.json and a step-0 checkpoint."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(cfg))
    writer = ckpt.Checkpointer(ckpt.checkpoint_dir(workdir))
    try:
        writer.save(0, {"params": params}, {"data_step": 0, "config": config_lib.to_dict(cfg),
                                             "imported_from": os.path.abspath(hf_dir)})
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------
# Writing


def _hf_tensors(arch: str, params, dtype, rope_tail: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of every Hugging Face tensor of `params`, gathered one at a time."""
    maps = param_maps(arch, params, rope_tail)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        m = maps[tuple(str(getattr(k, "key", k)) for k in path)]
        n = len(m.stack)
        tensor_shape = leaf.shape[n:]
        for idx in np.ndindex(*leaf.shape[:n]) if n else [()]:
            block = np.asarray(jax.device_get(leaf[idx] if n else leaf), np.float32)
            if m.kernel:
                block = block.reshape(math.prod(tensor_shape[:m.kernel]), -1).T
                if m.rope_tail:
                    interleaved = np.empty_like(block)
                    interleaved[rope_rows(tensor_shape[m.kernel:], m.rope_tail)] = block
                    block = interleaved
            elif m.flat:
                block = block.reshape(-1)
            yield m.name(*idx), np.ascontiguousarray(block).astype(dtype)


def source_config(workdir: str, cfg: Config, name: str = SOURCE_CONFIG) -> dict:
    """The config.json (`name`: another file kept from it) a run was imported from: kept in its
    workdir, or in the workdir it was fine-tuned from (init_from, followed back); {} for a run
    trained from scratch."""
    seen = set()
    while workdir and workdir not in seen:
        seen.add(workdir)
        path = os.path.join(workdir, name)
        if os.path.exists(path):
            return read_config(path)
        try:
            workdir = restore.load_config(workdir).init_from
        except (FileNotFoundError, config_lib.ConfigError):
            return {}
    return {}


@workdir_lock.holding("out")
def export_checkpoint(workdir: str, out: str, dtype: str = "float32", max_shard_bytes: int = 2 << 30,
                      step: int | None = None) -> dict:
    """Writes `workdir`'s params (checkpoint `step`, default the latest) as a Hugging Face checkpoint
    directory `out`: safetensors shards of at most `max_shard_bytes`, their index, config.json,
    generation_config.json and the tokenizer files (with the chat template, where the source had
    one). Returns the index's metadata."""
    cfg, params, step = restore.load_params(workdir, return_step=True, step=step)
    if quantize.is_quantized_tree(params):
        raise HFError(f"{workdir} holds a quantized checkpoint; export the float run it came from")
    arch = hf_architecture(cfg.model)
    if dtype not in DTYPES:
        raise HFError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if os.path.exists(os.path.join(out, "config.json")):
        raise HFError(f"{out} already holds a checkpoint (config.json); choose a new --out")
    os.makedirs(out, exist_ok=True)
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    special = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    source = source_config(workdir, cfg)
    if cfg.model.tokenizer == "bytes" and source:  # no tokenizer of its own: the source's ids, not the bytes'
        special = {k: source.get(k) for k in special}
    shards, current, size, total = [], {}, 0, 0
    rope_tail = cfg.model.mla.qk_rope_head_dim if arch == DEEPSEEK else 0  # written interleaved (rope_interleave)
    for name, array in _hf_tensors(arch, params, DTYPES[dtype], rope_tail):
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
            json.dump(hf_config(cfg.model, special, dtype, source), f, indent=2)
        # The source's generation settings where it had them (an eos list wins over the single id).
        generation = {k: v for k, v in special.items() if v is not None}
        generation.update(source_config(workdir, cfg, SOURCE_GENERATION_CONFIG))
        with open(os.path.join(out, GENERATION_CONFIG), "w") as f:
            json.dump(generation, f, indent=2)
        if cfg.model.tokenizer != "bytes":
            source = os.path.dirname(tok.name)
            for name in TOKENIZER_FILES:
                if os.path.exists(os.path.join(source, name)):
                    shutil.copyfile(os.path.join(source, name), os.path.join(out, name))
    return {"architecture": arch, "step": step, "shards": len(shards), **metadata}
