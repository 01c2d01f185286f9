"""Labelled text for sequence classification: sources, class names and deterministic batches.

Sources (DataConfig.dataset):
  "folder"           `data.path` holds one subfolder of text files per class (Keras's
                     text_dataset_from_directory layout), or train/ and test/ (or validation/)
                     folders that each hold them; otherwise files are split by a hash of their
                     relative path (data.split_files) with data.eval_fraction.
  "jsonl", "csv"     `data.path` is a file whose records have data.text_feature and
                     data.label_feature (a class name, or an integer index into data.classes) and
                     optionally a `split`; otherwise records are split by a hash of their text.
  "stdlib_packages"  the embedded task: ~600-byte snippets of the standard library labelled by their
                     top-level package (the 8 with the most bytes among the language model's
                     training files, or data.classes). Split by file exactly as the python_stdlib
                     corpus is, so no validation snippet comes from a file the LM trained on.
  anything else      a TFDS dataset prepared under data_dir, with a text feature and a ClassLabel
                     (or labels named by data.classes).

Local sources are written once as array_record by `JaxllmLabelledText`; every source is read back
through TFDS's random-access data source, so TensorFlow is never imported.

An example is [BOS] + its text's tokens, truncated to seq_len and padded on data.padding_side. Batch
t is a pure function of (seed, t): the train split in a fresh shuffled order every epoch, any other
in file order, its last batch (and any after it) filled with weight-0 rows, so that evaluating
`num_batches` batches counts every example once.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tensorflow_datasets.text  # registers glue/*, super_glue/*, ...: TFDS does not find them lazily

from jaxllm import data
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.config import Config, ConfigError, DataConfig
from jaxllm.tokenizer import BYTES, Tokenizer

LOCAL_SOURCES = ("folder", "jsonl", "csv", "stdlib_packages")
NUM_PACKAGES = 8
SNIPPET_BYTES = 600
_MIN_VISIBLE_BYTES = 150  # a snippet with fewer non-whitespace bytes is mostly blank: skipped
_FORMAT = 1  # part of every local dataset's name: bump when examples are made differently
_READ_CHUNK = 1024
_INTEGER = re.compile(r"-?\d+")

# (key, UTF-8 text, label index) of one example; the key says where it came from.
Example = tuple[str, bytes, int]


# ---------------------------------------------------------------------------------------------
# The local builder


@dataclasses.dataclass(eq=False)
class LabelledConfig(tfds.core.BuilderConfig):
    class_names: tuple[str, ...] = ()
    splits: dict = dataclasses.field(default_factory=dict, repr=False)  # split -> [item]
    load: Callable[[Any], Iterator[Example]] | None = dataclasses.field(default=None, repr=False)


class JaxllmLabelledText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Labelled local text; the config carries the class names, each split's items and `load`,
    which turns an item (a file, a record) into examples."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # nothing to download (see data.JaxllmTextFiles)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.builder_config.description,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=list(self.builder_config.class_names)),
                "key": tfds.features.Text(),
            }),
            disable_shuffling=True,  # file order: reproducible, and evaluation follows it
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {name: self._generate_examples(items) for name, items in self.builder_config.splits.items()}

    def _generate_examples(self, items):
        for item in items:
            for key, text, label in self.builder_config.load(item):
                yield key, {"text": text, "label": label, "key": key}


# ---------------------------------------------------------------------------------------------
# Local sources: each gives (fingerprint parts, make), make() -> (class names, split -> items, load)


def class_index(found: Sequence[str], classes: Sequence[str], where: str) -> tuple[tuple[str, ...], dict]:
    """Class names (data.classes, or the `found` names sorted) and name -> index."""
    names = tuple(classes) if classes else tuple(sorted(set(found)))
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise ConfigError(f"{where}: label(s) {unknown} not in data.classes={list(names)}; add or drop them")
    if not names:
        raise ConfigError(f"{where}: no classes found")
    return names, {n: i for i, n in enumerate(names)}


def label_index(raw: Any, names: Sequence[str], where: str) -> int:
    """A raw label, a class name or an integer index into `names`, as an index."""
    raw = raw.item() if isinstance(raw, np.ndarray) else raw
    text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    if text in names:
        return names.index(text)
    if _INTEGER.fullmatch(text) and 0 <= int(text) < len(names):
        return int(text)
    raise ConfigError(f"{where}: unknown label {text!r}: not one of data.classes={list(names)} nor an index")


def require_path(cfg: DataConfig, kind: str, holding: str) -> str:
    """data.path resolved, if it is an existing `kind` ("folder" or "file") of `holding`."""
    if not cfg.path:
        raise ConfigError(f"data.dataset={cfg.dataset} needs data.path, the {kind} of {holding}")
    path = os.path.realpath(os.path.expanduser(cfg.path))
    if not os.path.exists(path):
        raise ConfigError(f"data.path={cfg.path!r} does not exist (relative to {os.getcwd()})")
    if os.path.isdir(path) != (kind == "folder"):
        raise ConfigError(f"data.path={cfg.path!r} must be a {kind} for data.dataset={cfg.dataset}")
    return path


def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))


def _files_under(path: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [os.path.relpath(os.path.join(dirpath, f), path) for f in filenames if not f.startswith(".")]
    return sorted(out)


def _stats(root: str, files: Sequence[str]) -> list[tuple[str, int, int]]:
    return [(rel, st.st_size, st.st_mtime_ns) for rel in files for st in [os.stat(os.path.join(root, rel))]]


def _folder(cfg: DataConfig):
    root = require_path(cfg, "folder", "labelled text")

    def holds_only_folders(d: str) -> bool:
        entries = os.listdir(os.path.join(root, d))
        return bool(_subdirs(os.path.join(root, d))) and not any(
            os.path.isfile(os.path.join(root, d, e)) for e in entries)

    split_dirs = [s for s in _subdirs(root) if s in ("train", "validation", "test")]
    by_split = "train" in split_dirs and len(split_dirs) > 1 and all(map(holds_only_folders, split_dirs))
    files: dict[str, list[tuple[str, str]]] = {}  # split -> [(path relative to root, class)]
    for split in split_dirs if by_split else [""]:
        for name in _subdirs(os.path.join(root, split)):
            inside = _files_under(os.path.join(root, split, name))
            if not inside:
                raise ConfigError(f"class folder {os.path.join(root, split, name)} is empty: add text files "
                                  "or remove it")
            files.setdefault(split, []).extend((os.path.join(split, name, f), name) for f in inside)
    if not files:
        raise ConfigError(f"data.path={cfg.path!r} has no class subfolders (one folder of text files per class)")
    if not by_split:
        label = dict(files.pop(""))
        splits = data.split_files(sorted(label), cfg.eval_fraction)
        files = {s: [(f, label[f]) for f in fs] for s, fs in splits.items() if fs}  # TFDS writes no empty split
    found = [c for fs in files.values() for _, c in fs]
    names, index = class_index(found, cfg.classes, f"data.path={cfg.path!r}")

    def load(item) -> Iterator[Example]:
        with open(os.path.join(root, item[0]), "rb") as f:
            yield item[0], f.read(), index[item[1]]

    stats = {s: _stats(root, [rel for rel, _ in fs]) for s, fs in files.items()}
    return [root, stats], lambda: (names, files, load)


def _read_table(cfg: DataConfig, path: str) -> list[tuple[str, str, Any, Any]]:
    """(key, text, raw label, split or None) of every record of a JSONL or CSV file."""
    fields = [cfg.text_feature, cfg.label_feature]
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        if cfg.dataset == "csv":
            reader = csv.DictReader(f)
            records = ((f"row{n}", r) for n, r in enumerate(reader, start=2))
        else:
            records = ((f"line{n}", json.loads(line)) for n, line in enumerate(f, start=1) if line.strip())
        for key, record in records:
            missing = [c for c in fields if not isinstance(record, dict) or c not in record]
            if missing:
                raise ConfigError(f"{path} {key}: no field {missing} (data.text_feature, data.label_feature); "
                                  f"it has {sorted(record) if isinstance(record, dict) else type(record).__name__}")
            if not isinstance(record[cfg.text_feature], str):
                raise ConfigError(f"{path} {key}: {cfg.text_feature!r} is not a string")
            rows.append((key, record[cfg.text_feature], record[cfg.label_feature], record.get("split")))
    if not rows:
        raise ConfigError(f"data.path={cfg.path!r} holds no records")
    return rows


def _table(cfg: DataConfig):
    path = require_path(cfg, "file", "labelled text")

    def make():
        rows, where = _read_table(cfg, path), f"data.path={cfg.path!r}"
        raw = [str(r[2]) for r in rows]
        if cfg.classes:
            names = tuple(cfg.classes)
        elif all(_INTEGER.fullmatch(x) for x in raw):  # integer labels: numbered in numeric order
            names = tuple(str(i) for i in sorted({int(x) for x in raw}))
        else:
            names = class_index(raw, (), where)[0]
        if any(r[3] is not None for r in rows):
            splits = [r[3] for r in rows]
            if None in splits:
                key = rows[splits.index(None)][0]
                raise ConfigError(f"{where} {key}: no 'split' although other records have one")
        else:  # by a hash of the text: duplicates stay together
            held = set(data.split_files(sorted({r[1] for r in rows}), cfg.eval_fraction).get("validation", []))
            splits = ["validation" if r[1] in held else "train" for r in rows]
        out: dict[str, list[Example]] = {}
        for (key, text, label, _), split in zip(rows, splits):
            example = (key, text.encode("utf-8"), label_index(label, names, f"{where} {key}"))
            out.setdefault(str(split), []).append(example)
        return names, out, lambda example: iter([example])

    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns, cfg.text_feature, cfg.label_feature], make


def stdlib_package_files(eval_fraction: float, classes: Sequence[str] = ()) -> tuple[str, tuple[str, ...], dict]:
    """(stdlib root, packages, split -> their files): the packages are `classes`, or the NUM_PACKAGES
    top-level package directories with the most bytes among the LM's train files; the split is the
    python_stdlib corpus's own (data.split_files over all its files)."""
    root, files = data.stdlib_files()
    splits = data.split_files(files, eval_fraction)
    size: dict[str, int] = {}
    for rel in splits["train"]:
        if "/" in rel:
            package = rel.split("/")[0]
            size[package] = size.get(package, 0) + os.path.getsize(os.path.join(root, rel))
    if classes:
        unknown = [c for c in classes if c not in {f.split("/")[0] for f in files if "/" in f}]
        if unknown:
            raise ConfigError(f"data.classes: {unknown} are not package directories of the standard library "
                              f"({root})")
        packages = tuple(classes)
    else:
        packages = tuple(p for _, p in sorted((-s, p) for p, s in size.items())[:NUM_PACKAGES])
    chosen = {s: [f for f in fs if f.split("/")[0] in packages] for s, fs in splits.items()}
    return root, packages, {s: fs for s, fs in chosen.items() if fs}


def snippets(text: bytes, size: int = SNIPPET_BYTES) -> Iterator[tuple[int, bytes]]:
    """(byte offset, chunk) of consecutive chunks of at most `size` bytes cut at line ends (a longer
    line is a chunk of its own), leaving out the mostly blank ones."""
    start, chunk = 0, b""
    for line in text.splitlines(keepends=True) + [None]:
        if chunk and (line is None or len(chunk) + len(line) > size):
            if len(re.sub(rb"\s", b"", chunk)) >= _MIN_VISIBLE_BYTES:
                yield start, chunk
            start, chunk = start + len(chunk), b""
        chunk += line or b""


def _stdlib(cfg: DataConfig):
    root, packages, files = stdlib_package_files(cfg.eval_fraction, cfg.classes)

    def load(rel) -> Iterator[Example]:
        with open(os.path.join(root, rel), "rb") as f:
            for offset, chunk in snippets(f.read()):
                yield f"{rel}:{offset}", chunk, packages.index(rel.split("/")[0])

    def make():
        for split, fs in files.items():
            absent = [p for p in packages if not any(f.startswith(p + "/") for f in fs)]
            if absent:
                print(f"stdlib_packages: no {split} files of {absent} at data.eval_fraction={cfg.eval_fraction} "
                      "(the LM corpus's split)", file=sys.stderr)
        return packages, files, load

    stats = {s: _stats(root, fs) for s, fs in files.items()}
    return [root, packages, SNIPPET_BYTES, _MIN_VISIBLE_BYTES, stats], make


_LOCAL = {"folder": _folder, "jsonl": _table, "csv": _table, "stdlib_packages": _stdlib}


def _prepare_local(cfg: DataConfig, data_dir: str):
    """The read-only TFDS builder of a local source, built first (once; under a lock) if needed."""
    if not 0 <= cfg.eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={cfg.eval_fraction} must be in [0, 1)")
    parts, make = _LOCAL[cfg.dataset](cfg)
    parts += [_FORMAT, cfg.eval_fraction, tuple(cfg.classes)]
    config_name = f"{cfg.dataset}-{hashlib.sha256(repr(parts).encode()).hexdigest()[:12]}"
    path = os.path.join(data_dir, "jaxllm_labelled_text", config_name, "1.0.0")
    done = os.path.join(path, "dataset_info.json")  # TFDS renames a finished build into place
    if not os.path.exists(done):
        with data.file_lock(os.path.join(data_dir, "jaxllm_locks", f"jaxllm_labelled_text-{config_name}.lock")):
            if not os.path.exists(done):
                names, splits, load = make()
                config = LabelledConfig(name=config_name, description=f"{cfg.dataset} {cfg.path}".strip(),
                                        class_names=names, splits=splits, load=load)
                print(f"building the labelled {cfg.dataset} dataset under {data_dir} (once)", file=sys.stderr)
                tfds.disable_progress_bar()
                with data.quiet_tfds():
                    builder = JaxllmLabelledText(data_dir=data_dir, config=config, file_format="array_record")
                    builder.download_and_prepare()
    with data.quiet_tfds():
        return tfds.builder_from_directory(path)


# ---------------------------------------------------------------------------------------------
# Any source: class names and examples


@dataclasses.dataclass(frozen=True)
class _Dataset:
    names: tuple[str, ...]
    text: str  # feature names
    label: str
    key: str | None
    to_index: Callable[[Any], int]  # a label feature's value -> index into `names`
    open: Callable[[str], tuple[Sequence[dict], str | None]]  # split -> (data source, cache dir)


def _named(cfg: DataConfig, data_dir: str) -> _Dataset:
    where = f"TFDS dataset {cfg.dataset!r}"
    builder = data.named_builder(cfg, data_dir, LOCAL_SOURCES)
    features = builder.info.features
    wanted = {"text_feature": cfg.text_feature, "label_feature": cfg.label_feature}
    missing = [f"data.{k}={v!r}" for k, v in wanted.items() if v not in features]
    if missing:
        raise ConfigError(f"{where} has no feature {' nor '.join(missing)}; "
                          f"its features: {sorted(features.keys())}")
    feature = features[cfg.label_feature]
    if isinstance(feature, tfds.features.ClassLabel):
        names, index = class_index(feature.names, cfg.classes, where)
        mapping = [index[n] for n in feature.names]
        to_index = lambda raw: mapping[int(raw)]
    elif cfg.classes:
        names = tuple(cfg.classes)
        to_index = lambda raw: label_index(raw, names, where)
    else:
        raise ConfigError(f"{where}: feature {cfg.label_feature!r} is not a ClassLabel; name its classes with "
                          "data.classes=a,b,...")
    return _Dataset(names, cfg.text_feature, cfg.label_feature, None, to_index,
                    lambda split: data.named_source(cfg, split, data_dir, builder=builder))


def _local(cfg: DataConfig, data_dir: str) -> _Dataset:
    builder = _prepare_local(cfg, data_dir)

    def open_split(split: str):
        if split not in builder.info.splits:
            raise ConfigError(f"{cfg.dataset} dataset {builder.data_path} has no split {split!r} (splits: "
                              f"{sorted(builder.info.splits.keys())}); set data.train_split / data.eval_split")
        cache = str(builder.data_path)
        return builder.as_data_source(split=split), (cache if os.access(cache, os.W_OK) else None)

    return _Dataset(tuple(builder.info.features["label"].names), "text", "label", "key", int, open_split)


def _dataset(cfg: DataConfig) -> _Dataset:
    return (_local if cfg.dataset in LOCAL_SOURCES else _named)(cfg, data.resolve_data_dir(cfg))


def class_names(cfg: Config) -> tuple[str, ...]:
    """The class names in label order; classifier.num_classes must be their number."""
    return check_class_count(cfg, _dataset(cfg.data).names)


def check_class_count(cfg: Config, names: tuple[str, ...]) -> tuple[str, ...]:
    """`names`, if classifier.num_classes is their number; else a clear error."""
    if cfg.classifier.num_classes != len(names):
        raise ConfigError(f"classifier.num_classes={cfg.classifier.num_classes} but data.dataset="
                          f"{cfg.data.dataset} has {len(names)} classes {list(names)}: "
                          f"set classifier.num_classes={len(names)}")
    return names


def _examples(ds: _Dataset, source: Sequence[dict]) -> Iterator[list[Example]]:
    """The examples of a data source, a chunk at a time (keys: their index where there are none)."""
    for lo in range(0, len(source), _READ_CHUNK):
        try:
            records = source.__getitems__(list(range(lo, min(lo + _READ_CHUNK, len(source)))))
        except (AttributeError, TypeError):  # plain sequences; tfds.testing.mock_data's is broken
            records = [source[i] for i in range(lo, min(lo + _READ_CHUNK, len(source)))]
        yield [(data.as_bytes(r[ds.key]).decode() if ds.key else str(i), data.as_bytes(r[ds.text]),
                ds.to_index(r[ds.label])) for i, r in enumerate(records, start=lo)]


def load_examples(cfg: DataConfig, split: str) -> list[tuple[str, str, int]]:
    """(key, text, label index) of every example of `split`, in order. The key says where it came
    from: the file (folder), "line7"/"row7" (jsonl/csv), "file:byte offset" (stdlib_packages), or
    its index (TFDS)."""
    ds = _dataset(cfg)
    source, _ = ds.open(split)
    return [(k, t.decode("utf-8", errors="replace"), y) for chunk in _examples(ds, source) for k, t, y in chunk]


# ---------------------------------------------------------------------------------------------
# Tokens and batches


def _tokenize(ds: _Dataset, source: Sequence[dict], tok: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [T] (no BOS), example starts int64 [N+1], labels int32 [N]) of a split."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    tokens, lengths, labels = [], [], []
    for chunk in _examples(ds, source):
        texts = [t for _, t, _ in chunk]
        if tok is BYTES:
            ids, lengths = [np.frombuffer(b"".join(texts), np.uint8)], lengths + [len(t) for t in texts]
        else:
            ids = [tok.encode(t.decode("utf-8", errors="replace")) for t in texts]
            lengths += [len(i) for i in ids]
        tokens += [i.astype(dtype) for i in ids]
        labels += [y for _, _, y in chunk]
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return np.concatenate(tokens or [np.zeros(0, dtype)]), starts, np.array(labels, np.int32)


def tokenized(cfg: DataConfig, split: str, tok: Tokenizer = BYTES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_tokenize`'s arrays, cached next to a writable prepared dataset per split and tokenizer file."""
    ds = _dataset(cfg)
    source, cache = ds.open(split)
    if cache is None or not (tok is BYTES or os.path.isfile(tok.name)):  # (a tokenizer made in code)
        return _tokenize(ds, source, tok)
    key = f"{split}/{ds.text}/{ds.label}/{ds.names}/{'' if tok is BYTES else data.file_digest(tok.name)}"
    stem = os.path.join(cache, f"jaxllm_labelled-{re.sub(r'[^A-Za-z0-9_.-]', '_', split)}-"
                               f"{hashlib.sha256(key.encode()).hexdigest()[:8]}")
    if not os.path.exists(stem + ".tokens.npy"):
        with data.file_lock(os.path.join(cache, "jaxllm_tokens.lock")):
            if not os.path.exists(stem + ".tokens.npy"):
                tokens, starts, labels = _tokenize(ds, source, tok)
                with open(stem + ".index.npz.tmp", "wb") as f:
                    np.savez(f, starts=starts, labels=labels)
                os.replace(stem + ".index.npz.tmp", stem + ".index.npz")
                with open(stem + ".tokens.npy.tmp", "wb") as f:
                    np.save(f, tokens)
                os.replace(stem + ".tokens.npy.tmp", stem + ".tokens.npy")  # last: its presence means complete
    with np.load(stem + ".index.npz") as index:
        return np.load(stem + ".tokens.npy", mmap_mode="r"), index["starts"], index["labels"]


class ExampleBatches:
    """The order of a split's examples in batches: batch t depends only on (seed, t). Shuffled
    splits run through a fresh permutation of their examples every epoch; the others in order, the
    rows after the last example being fillers (index -1, weight 0). Subclasses turn example
    indices into arrays (`pack`)."""

    def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool):
        self.num_examples, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
        self.num_batches = -(-num_examples // batch_size)  # the batches holding every example once
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
        return self._perms[epoch]

    def examples(self, step: int, lo: int, hi: int) -> np.ndarray:
        """Example indices of rows lo..hi-1 of batch `step`; -1 marks a weight-0 filler row."""
        if not 0 <= lo < hi <= self.batch_size or step < 0:
            raise ValueError(f"need step >= 0 and 0 <= lo < hi <= {self.batch_size}, got {step}, {lo}, {hi}")
        i = np.arange(step * self.batch_size + lo, step * self.batch_size + hi, dtype=np.int64)
        if not self.shuffle:
            return np.where(i < self.num_examples, i, -1)
        epoch, offset = np.divmod(i, self.num_examples)
        return np.array([self._permutation(int(e))[o] for e, o in zip(epoch, offset)], np.int64)

    def pack(self, examples: np.ndarray) -> dict:
        raise NotImplementedError

    def batch_rows(self, step: int, lo: int, hi: int) -> dict:
        """Rows lo..hi-1 of batch `step` (the rows one process's devices hold)."""
        return self.pack(self.examples(step, lo, hi))

    def local_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """This process's share of batch `step`: [batch_size / process_count] rows."""
        B, P = self.batch_size, process_count
        if B % P:
            raise ConfigError(f"batch_size={B} is not divisible by the process count {P}")
        if not 0 <= process_index < P:
            raise ValueError(f"need 0 <= process_index < {P}, got {process_index}")
        return self.batch_rows(step, process_index * (B // P), (process_index + 1) * (B // P))

    def global_batch(self, step: int) -> dict:
        return self.local_batch(step, 0, 1)


def example_ends(tok: Tokenizer) -> tuple[list[int], list[int]]:
    """The ids before and after an example's text: [BOS] (if the tokenizer has one); an encoder's
    tokenizer (BERT, RoBERTa: [CLS] and [SEP] ids) [CLS] text [SEP], as its own post-processor."""
    if tok.cls_id is not None and tok.sep_id is not None:
        return [tok.cls_id], [tok.sep_id]
    return ([] if tok.bos_id is None else [tok.bos_id]), []


def example_ids(tok: Tokenizer, text_ids, length: int) -> np.ndarray:
    """An example's ids, its text cut so that the ends fit in `length`."""
    prefix, suffix = example_ends(tok)
    text_ids = np.asarray(text_ids)[:max(length - len(prefix) - len(suffix), 0)]
    return np.concatenate([prefix, text_ids, suffix])[:length].astype(np.int32)


class LabelledBatches(ExampleBatches):
    """Labelled text in batches (see `ExampleBatches` for the order).

    inputs, segment_ids (1 on tokens, 0 on padding), positions (0.. from the first token) int32
    [B, L]; labels int32 [B]; weights float32 [B] (0 on rows that fill an evaluation split's last
    batch, and on every row of the batches after it)."""

    def __init__(self, cfg: Config, split: str, tokenizer: Tokenizer = BYTES, shuffle: bool | None = None):
        d, t = cfg.data, cfg.train
        if t.seq_len <= 0 or t.batch_size <= 0:
            raise ConfigError(f"train.seq_len={t.seq_len} and train.batch_size={t.batch_size} must be positive")
        if d.padding_side not in ("right", "left"):
            raise ConfigError(f"data.padding_side={d.padding_side!r}; choose right or left")
        self.split, self.seq_len = split, t.seq_len
        self.left = d.padding_side == "left"
        self.class_names = class_names(cfg)
        self.pad_id = tokenizer.pad_or_eos
        self.tokenizer = tokenizer
        self.tokens, self.starts, self.labels = tokenized(d, split, tokenizer)
        if not len(self.labels):
            raise ConfigError(f"{d.dataset}[{split}] has no examples")
        super().__init__(len(self.labels), t.batch_size, d.seed,
                         split == d.train_split if shuffle is None else shuffle)

    def pack(self, examples: np.ndarray) -> dict:
        """The batch arrays of these example indices (-1: a filler row)."""
        R, L = len(examples), self.seq_len
        out = {"inputs": np.full((R, L), self.pad_id, np.int32), "segment_ids": np.zeros((R, L), np.int32),
               "positions": np.zeros((R, L), np.int32), "labels": np.zeros(R, np.int32),
               "weights": np.zeros(R, np.float32)}
        for r, e in enumerate(examples):
            if e < 0:
                continue
            ids = example_ids(self.tokenizer, self.tokens[self.starts[e]:self.starts[e + 1]], L)
            cols = slice(L - len(ids), L) if self.left else slice(0, len(ids))
            out["inputs"][r, cols], out["segment_ids"][r, cols] = ids, 1
            out["positions"][r, cols] = np.arange(len(ids))
            out["labels"][r], out["weights"][r] = self.labels[e], 1.0
        return out


def train_batches(cfg: Config) -> LabelledBatches:
    return LabelledBatches(cfg, cfg.data.train_split, tokenizer_lib.load(cfg.model.tokenizer), shuffle=True)


def eval_batches(cfg: Config) -> LabelledBatches:
    if not cfg.data.eval_split:
        raise ConfigError("data.eval_split is empty (evaluation off); set it to a split to evaluate on")
    return LabelledBatches(cfg, cfg.data.eval_split, tokenizer_lib.load(cfg.model.tokenizer), shuffle=False)
