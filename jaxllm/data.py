"""Data: byte tokenizer, TFDS sources read without TensorFlow, packing, deterministic batches.

Sources (DataConfig.dataset):
  "python_stdlib"  this interpreter's standard library source, built once into a TFDS dataset.
  "text_files"     the files matched by DataConfig.text_files, one document per file.
  anything else    a TFDS dataset with a text feature, already prepared (array_record) in data_dir.

Local files go through `JaxllmTextFiles`, a TFDS GeneratorBasedBuilder that writes array_record;
every source is read back through TFDS's random-access data source, so TensorFlow is never imported.

Packing: each split becomes one token stream, documents as [BOS] bytes [EOS] back to back (cached
as .npy next to a writable dataset), plus the stream offsets where documents start. Row r is
stream[r*L : r*L + L + 1] (padded with PAD at the very end); inputs are its first L tokens,
targets its last L. Within a row documents are numbered 1, 2, ... (0 = padding) and positions
restart at 0 at every document start *and* at the row start (a row never sees the row before it).

Batch t is a pure function of (seed, t), so a resumed run only needs the step number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import logging
import os
import re
import sys
import sysconfig
import uuid
from typing import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from jaxllm.config import Config, ConfigError, DataConfig
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.registry import Registry
from jaxllm.tokenizer import BOS_ID, BYTES, EOS_ID, NUM_TOKEN_IDS, PAD_ID, Tokenizer, decode, encode  # noqa: F401


# Directory names never taken from the standard library: tests, IDLE's tests, installed packages.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_READ_CHUNK = 1024  # documents fetched from a data source at a time


# ---------------------------------------------------------------------------------------------
# The local text-files builder


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    root: str = ""
    files: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # relative to `root`
    eval_fraction: float = 0.05


def unit_hash(text: str) -> float:
    """A string's stable place in [0, 1) (sha256): splits by it survive other items coming and going."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def split_files(files: Sequence[str], eval_fraction: float) -> dict[str, list[str]]:
    """Train/validation split by a hash of each relative path: stable when files come and go."""
    scored = sorted((unit_hash(f), f) for f in files)
    num_eval = sum(u < eval_fraction for u, _ in scored)
    if eval_fraction > 0 and len(scored) >= 2:  # TFDS cannot write an empty split
        num_eval = min(max(num_eval, 1), len(scored) - 1)
    splits = {"train": sorted(f for _, f in scored[num_eval:])}
    if num_eval:
        splits["validation"] = sorted(f for _, f in scored[:num_eval])
    return splits


class JaxllmTextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Local text files, one document per file; the config carries the file list."""

    VERSION = tfds.core.Version("1.0.0")
    # Nothing is downloaded; also keeps TFDS from looking for a checksums file beside this module
    # (which fails when the package is a namespace package).
    url_infos = None

    def _info(self) -> tfds.core.DatasetInfo:
        # Not `dataset_info_from_configs`: that reads metadata files next to the class's module.
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Text files under {self.builder_config.root}",
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "path": tfds.features.Text()}
            ),
            disable_shuffling=True,  # keep sorted path order: reproducible and easy to check
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        return {
            name: self._generate_examples(files)
            for name, files in split_files(cfg.files, cfg.eval_fraction).items()
        }

    def _generate_examples(self, files):
        for rel in files:
            with open(os.path.join(self.builder_config.root, rel), "rb") as f:
                yield rel, {"text": f.read(), "path": rel}  # raw bytes: the tokenizer is bytes


def resolve_data_dir(cfg: DataConfig) -> str:
    default = "~/.cache/jaxllm/tensorflow_datasets"
    data_dir = cfg.data_dir or os.environ.get("JAXLLM_DATA_DIR") or default
    return os.path.abspath(os.path.expanduser(data_dir))


def stdlib_files(root: str | None = None) -> tuple[str, list[str]]:
    """(root, sorted relative paths) of the non-test .py files of the standard library."""
    root = os.path.realpath(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("test_"):
                files.append(os.path.relpath(os.path.join(dirpath, name), root))
    return root, sorted(files)


def glob_files(pattern: str) -> tuple[str, list[str]]:
    """(root, sorted relative paths) of the files matching `pattern` (`**` recurses)."""
    if not pattern:
        raise ConfigError(
            "data.dataset=text_files needs data.text_files, a glob such as 'corpus/*.txt'"
        )
    paths = sorted(
        os.path.realpath(p)
        for p in glob.glob(os.path.expanduser(pattern), recursive=True)
        if os.path.isfile(p)
    )
    if not paths:
        raise ConfigError(
            f"data.text_files={pattern!r} matches no files (relative to {os.getcwd()}); "
            "point it at existing files, e.g. data.text_files='corpus/**/*.txt'"
        )
    root = os.path.dirname(paths[0]) if len(paths) == 1 else os.path.commonpath(paths)
    return root, [os.path.relpath(p, root) for p in paths]


def _fingerprint(root: str, files: Sequence[str], eval_fraction: float) -> str:
    """Short hash of everything the built dataset depends on, so different corpora never collide."""
    h = hashlib.sha256(f"{root}\0{eval_fraction!r}".encode())
    for rel in files:
        st = os.stat(os.path.join(root, rel))
        h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


class _DropExpectedTfdsWarnings(logging.Filter):
    """TFDS warns on each construction with a config not in BUILDER_CONFIGS: expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("custom data configuration" in message or "has no dataset_info.json" in message)


@contextlib.contextmanager
def quiet_tfds() -> Iterator[None]:
    logger, drop = logging.getLogger("absl"), _DropExpectedTfdsWarnings()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Exclusive lock between processes on this host (flock; may not lock across NFS clients)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_text_files(
    data_dir: str, name: str, root: str, files: Sequence[str], eval_fraction: float
) -> JaxllmTextFiles:
    """Builds (once; safe against concurrent builders) and returns the TFDS dataset of `files`."""
    if not 0 <= eval_fraction < 1:
        raise ConfigError(f"data.eval_fraction={eval_fraction} must be in [0, 1)")
    if len(files) < 2 and eval_fraction > 0:
        raise ConfigError(
            f"{name}: only {len(files)} file(s) under {root}; a validation split needs at least "
            "two files: add files, or train without evaluation: data.eval_fraction=0 data.eval_split="
        )
    safe_name = re.sub(r"[^\w.+-]", "_", name)
    config_name = f"{safe_name}-{_fingerprint(root, files, eval_fraction)}"
    config = TextFilesConfig(
        name=config_name, root=root, files=tuple(files), eval_fraction=eval_fraction,
        description=f"{len(files)} files under {root}",
    )

    def make() -> JaxllmTextFiles:
        return JaxllmTextFiles(data_dir=data_dir, config=config, file_format="array_record")

    with quiet_tfds():
        builder = make()
        if builder.is_prepared():
            return builder
        # TFDS writes into a temporary dir and renames it, but a second racing builder would then
        # fail on the rename; the lock makes it wait and reuse the first one's result instead.
        lock = os.path.join(data_dir, "jaxllm_locks", f"{builder.name}-{config_name}.lock")
        with file_lock(lock):
            if not builder.is_prepared():
                print(f"building the {name} dataset under {data_dir} (once)", file=sys.stderr)
                tfds.disable_progress_bar()  # TFDS's bars would bury the training progress bar
                builder.download_and_prepare()
        return make()  # a fresh builder reads split sizes from the written dataset_info.json


# ---------------------------------------------------------------------------------------------
# Documents


class Documents(Sequence[str]):
    """Random-access view of one text feature of a TFDS data source, as str."""

    cache_key = ""  # what, besides the source, the text depends on (a transform's key)

    def __init__(self, source: Sequence[dict], feature: str, description: str = ""):
        self.source, self.feature, self.description = source, feature, description

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = index.__index__()
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range for {len(self)} documents")
        return as_bytes(self.source[index][self.feature]).decode("utf-8", errors="replace")

    def raw(self, indices: Sequence[int]) -> list[bytes]:
        """The undecoded bytes of several documents, fetched in one call where possible."""
        try:
            records = self.source.__getitems__(list(indices))
        except (AttributeError, TypeError):
            # tfds.testing.mock_data's __getitems__ is broken in tfds 4.9.x (called without self).
            records = [self.source[i] for i in indices]
        return [as_bytes(r[self.feature]) for r in records]


@dataclasses.dataclass(frozen=True)
class Transform:
    """A document transform (data.transform): `fn` maps one document's text to its new text, a pure
    function; `key` names everything it depends on (token streams are cached under it)."""

    fn: Callable[[str], str]
    key: str


# Text datasets built here from local files rather than read from a prepared TFDS dataset.
LOCAL_TEXT_SOURCES = ("python_stdlib", "text_files")

# name -> factory(DataConfig) -> Transform; jaxllm.knowledge registers kg_facts.
DOCUMENT_TRANSFORMS = Registry("data.transform")


class TransformedDocuments(Documents):
    """Documents passed through a Transform; a document it leaves unchanged keeps its raw bytes."""

    def __init__(self, docs: Documents, transform: Transform):
        super().__init__(docs.source, docs.feature, f"{docs.description}|{transform.key}")
        self.transform = transform
        self.cache_key = f"/{transform.key}"

    def __getitem__(self, index):
        if isinstance(index, slice):
            return super().__getitem__(index)
        return self.transform.fn(super().__getitem__(index))

    def raw(self, indices: Sequence[int]) -> list[bytes]:
        out = []
        for raw in super().raw(indices):
            text = raw.decode("utf-8", errors="replace")
            new = self.transform.fn(text)
            out.append(raw if new == text else new.encode("utf-8"))
        return out


def as_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(np.asarray(value).item())  # a 0-d numpy bytes/object array


def _prepare_hint(name: str, data_dir: str) -> str:
    return (f"prepare it once (array_record format, the only one read without TensorFlow), e.g. "
            f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`, or set "
            f"data.data_dir to the directory where it is prepared")


def named_builder(cfg: DataConfig, data_dir: str, local_sources: Sequence[str] = LOCAL_TEXT_SOURCES):
    """The TFDS builder of data.dataset, or a clear error that also names the caller's own
    (`local_sources`) dataset names."""
    try:
        return tfds.builder(cfg.dataset, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
        raise ConfigError(
            f"data.dataset={cfg.dataset!r} is not one of {', '.join(local_sources)}, nor a TFDS dataset "
            f"registered or prepared under data_dir={data_dir}; {_prepare_hint(cfg.dataset, data_dir)}"
        ) from e


def named_source(cfg: DataConfig, split: str, data_dir: str, feature_key: str = "text_feature", builder=None):
    """(data source, writable cache dir or None) of a registered/prepared TFDS dataset that has the
    feature data.<feature_key> names (`builder`: its `named_builder`, if the caller has it)."""
    name, feature = cfg.dataset, getattr(cfg, feature_key)
    prepare_hint = _prepare_hint(name, data_dir)
    builder = builder if builder is not None else named_builder(cfg, data_dir)
    features = builder.info.features
    if feature not in features:
        raise ConfigError(
            f"TFDS dataset {name!r} has no feature data.{feature_key}={feature!r}; "
            f"available features: {sorted(features.keys())}"
        )
    try:
        source = builder.as_data_source(split=split)
    except Exception as e:  # TFDS raises NotImplementedError/ValueError/AssertionError here
        if not builder.is_prepared():
            raise ConfigError(
                f"TFDS dataset {name!r} is not prepared under data_dir={data_dir} "
                f"(no {builder.data_path}); {prepare_hint}"
            ) from e
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise ConfigError(
                f"TFDS dataset {name!r} in {builder.data_path} is stored as "
                f"{builder.info.file_format.value}; random access without TensorFlow needs "
                f"array_record: {prepare_hint}"
            ) from e
        raise ConfigError(
            f"cannot read split {split!r} of TFDS dataset {name!r} (splits: "
            f"{sorted(builder.info.splits.keys())}): {e}"
        ) from e
    # Cache tokens only next to a really prepared, writable dataset (never under mock_data).
    cache = str(builder.data_path) if builder.is_prepared() else None
    if cache and not (os.path.isdir(cache) and os.access(cache, os.W_OK)):
        cache = None
    return source, cache


def stdlib_builder(data_dir: str, eval_fraction: float):
    """The TFDS builder of this Python's standard-library corpus, prepared on first use."""
    root, files = stdlib_files()
    name = f"python_stdlib-{sys.version_info.major}.{sys.version_info.minor}"
    return prepare_text_files(data_dir, name, root, files, eval_fraction)


def _open(cfg: DataConfig, split: str) -> tuple[Documents, str | None]:
    data_dir = resolve_data_dir(cfg)
    if cfg.dataset in LOCAL_TEXT_SOURCES:
        if cfg.dataset == "python_stdlib":
            builder = stdlib_builder(data_dir, cfg.eval_fraction)
        else:
            root, files = glob_files(cfg.text_files)
            builder = prepare_text_files(data_dir, "text_files", root, files, cfg.eval_fraction)
        try:
            source = builder.as_data_source(split=split)
        except Exception as e:
            raise ConfigError(
                f"no split {split!r} in {cfg.dataset} dataset {builder.data_path} (splits: "
                f"{sorted(builder.info.splits.keys())}; validation exists when "
                "data.eval_fraction > 0; an empty data.eval_split= trains without evaluation)"
            ) from e
        text_feature, cache = "text", str(builder.data_path)
    else:
        source, cache = named_source(cfg, split, data_dir)
        text_feature = cfg.text_feature
    docs = Documents(source, text_feature, f"{cfg.dataset}[{split}]")
    if cfg.transform:
        docs = TransformedDocuments(docs, DOCUMENT_TRANSFORMS.get(cfg.transform)(cfg))
    return docs, cache


def load_documents(cfg: DataConfig, split: str) -> Documents:
    """The documents of `split` as a random-access sequence of str (wraps the TFDS data source)."""
    return _open(cfg, split)[0]


# ---------------------------------------------------------------------------------------------
# Token stream


def _token_dtype(tok: Tokenizer):
    return np.uint16 if tok.vocab_size <= 2**16 else np.uint32


def _tokenize_chunks(docs: Documents, tok: Tokenizer = BYTES) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (tokens, int64 document lengths in tokens) for chunks of documents: each document
    is BOS, its tokens, EOS (the special tokens the tokenizer has)."""
    if tok is not BYTES:
        specials = ([tok.bos_id] if tok.bos_id is not None else [], [tok.eos_id] if tok.eos_id is not None else [])
        for lo in range(0, len(docs), _READ_CHUNK):
            texts = docs.raw(range(lo, min(lo + _READ_CHUNK, len(docs))))
            ids = [np.concatenate([specials[0], tok.encode(t.decode("utf-8", errors="replace")), specials[1]])
                   for t in texts]
            yield (np.concatenate(ids).astype(_token_dtype(tok)) if ids else np.zeros(0, _token_dtype(tok)),
                   np.array([len(i) for i in ids], np.int64))
        return
    for lo in range(0, len(docs), _READ_CHUNK):
        texts = docs.raw(range(lo, min(lo + _READ_CHUNK, len(docs))))
        lengths = np.array([len(t) + 2 for t in texts], np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        tokens = np.empty(int(lengths.sum()), np.uint16)
        is_byte = np.ones(len(tokens), bool)
        is_byte[starts] = is_byte[starts + lengths - 1] = False
        tokens[is_byte] = np.frombuffer(b"".join(texts), np.uint8)
        tokens[starts], tokens[starts + lengths - 1] = BOS_ID, EOS_ID
        yield tokens, lengths


def token_stream(cfg: DataConfig, split: str, tok: Tokenizer = BYTES) -> tuple[np.ndarray, np.ndarray]:
    """(tokens uint16 or uint32 [N], document start offsets int64 [num_docs]) of a split, in
    `tok`'s ids; cached if it can."""
    docs, cache_dir = _open(cfg, split)
    if cache_dir is None:
        chunks = list(_tokenize_chunks(docs, tok))
        tokens = np.concatenate([c[0] for c in chunks] or [np.zeros(0, _token_dtype(tok))])
        lengths = np.concatenate([c[1] for c in chunks] or [np.zeros(0, np.int64)])
        return tokens, np.cumsum(lengths) - lengths
    # The byte tokenizer's streams keep their names; another tokenizer's carry its file's digest.
    tokenizer_key = "" if tok is BYTES else "/" + file_digest(tok.name)
    digest = hashlib.sha256(f"{split}/{docs.feature}{tokenizer_key}{docs.cache_key}".encode()).hexdigest()[:8]
    key = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', split)}-{digest}"
    tokens_path = os.path.join(cache_dir, f"jaxllm_tokens-{key}.npy")
    starts_path = os.path.join(cache_dir, f"jaxllm_starts-{key}.npy")
    if not os.path.exists(tokens_path):
        with file_lock(os.path.join(cache_dir, "jaxllm_tokens.lock")):
            if not os.path.exists(tokens_path):
                _write_stream(docs, tokens_path, starts_path, tok)
    return np.load(tokens_path, mmap_mode="r"), np.load(starts_path)


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _write_stream(docs: Documents, tokens_path: str, starts_path: str, tok: Tokenizer = BYTES) -> None:
    """Streams tokens through a raw temp file, so a large split never sits in memory twice."""
    tmp = f"{tokens_path}.{uuid.uuid4().hex}.tmp"
    lengths = []
    try:
        with open(tmp + ".raw", "wb") as f:
            for tokens, chunk_lengths in _tokenize_chunks(docs, tok):
                tokens.tofile(f)
                lengths.append(chunk_lengths)
        lengths = np.concatenate(lengths or [np.zeros(0, np.int64)])
        np.save(tmp + ".starts.npy", np.cumsum(lengths) - lengths)
        dtype = _token_dtype(tok)
        raw = np.memmap(tmp + ".raw", dtype, "r") if lengths.sum() else np.zeros(0, dtype)
        np.save(tmp + ".npy", raw)
        del raw
        os.replace(tmp + ".starts.npy", starts_path)
        os.replace(tmp + ".npy", tokens_path)  # last: its presence means the pair is complete
    finally:
        for suffix in (".raw", ".npy", ".starts.npy"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)


# ---------------------------------------------------------------------------------------------
# Packing and batches


def pack_rows(tokens: np.ndarray, starts: np.ndarray, rows: np.ndarray, seq_len: int, pad_id: int = PAD_ID) -> dict:
    """Rows `rows` of the packed stream: inputs/targets/segment_ids/positions int32, weights f32."""
    n, L = len(tokens), seq_len
    idx = np.asarray(rows, np.int64)[:, None] * L + np.arange(L + 1)  # [R, L+1]
    valid = idx < n
    tok = np.where(valid, np.asarray(tokens)[np.minimum(idx, n - 1)], pad_id).astype(np.int32)
    doc = np.where(valid, np.searchsorted(starts, idx, side="right") - 1, -1)
    doc_in, doc_tg = doc[:, :-1], doc[:, 1:]
    is_real = doc_in >= 0
    new_seg = np.ones_like(is_real)
    new_seg[:, 1:] = doc_in[:, 1:] != doc_in[:, :-1]
    arange = np.broadcast_to(np.arange(L), doc_in.shape)
    seg_start = np.maximum.accumulate(np.where(new_seg, arange, 0), axis=1)
    return {
        "inputs": tok[:, :-1],
        "targets": tok[:, 1:],
        "segment_ids": np.where(is_real, np.cumsum(new_seg, axis=1), 0).astype(np.int32),
        "positions": np.where(is_real, arange - seg_start, 0).astype(np.int32),
        "weights": (is_real & (doc_in == doc_tg)).astype(np.float32),
    }


class Batches:
    """Deterministic batches of packed rows of one split: batch t depends only on (seed, t)."""

    def __init__(
        self, cfg: DataConfig, split: str, seq_len: int, batch_size: int, shuffle: bool = True,
        tokenizer: Tokenizer = BYTES,
    ):
        if seq_len <= 0 or batch_size <= 0:
            raise ConfigError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
        self.cfg, self.split, self.seq_len, self.batch_size = cfg, split, seq_len, batch_size
        self.shuffle, self.seed = shuffle, cfg.seed
        self.tokens, self.starts = token_stream(cfg, split, tokenizer)
        self.pad_id = tokenizer.pad_or_eos
        self.num_tokens, self.num_documents = len(self.tokens), len(self.starts)
        # The last row is padded rather than dropped, so small splits still give a row.
        self.num_rows = max(0, -(-(self.num_tokens - 1) // seq_len))
        if self.num_rows == 0:
            raise ConfigError(f"{cfg.dataset}[{split}] has no tokens for a row of length {seq_len}")
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs when B <= num_rows
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng((self.seed, epoch))
            self._perms[epoch] = rng.permutation(self.num_rows)
        return self._perms[epoch]

    def rows(self, step: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
        """Row indices this process reads at `step`."""
        B, P = self.batch_size, process_count
        if B % P:
            raise ConfigError(f"batch_size={B} is not divisible by the process count {P}")
        if not 0 <= process_index < P or step < 0:
            raise ValueError(
                f"need step >= 0 and 0 <= process_index < {P}, got {step}, {process_index}"
            )
        return self.rows_between(step, process_index * (B // P), (process_index + 1) * (B // P))

    def rows_between(self, step: int, lo: int, hi: int) -> np.ndarray:
        """Indices of rows lo..hi-1 of batch `step`."""
        if not 0 <= lo < hi <= self.batch_size or step < 0:
            raise ValueError(f"need step >= 0 and 0 <= lo < hi <= {self.batch_size}, got {step}, {lo}, {hi}")
        i = np.arange(step * self.batch_size + lo, step * self.batch_size + hi, dtype=np.int64)
        epoch, offset = np.divmod(i, self.num_rows)
        if not self.shuffle:
            return offset
        out = np.empty_like(offset)
        for e in np.unique(epoch):
            out[epoch == e] = self._permutation(int(e))[offset[epoch == e]]
        return out

    def local_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        """This process's share of batch `step`: arrays [batch_size / process_count, seq_len]."""
        rows = self.rows(step, process_index, process_count)
        return pack_rows(self.tokens, self.starts, rows, self.seq_len, self.pad_id)

    def batch_rows(self, step: int, lo: int, hi: int) -> dict:
        """Rows lo..hi-1 of batch `step` (the rows one process's devices hold)."""
        return pack_rows(self.tokens, self.starts, self.rows_between(step, lo, hi), self.seq_len, self.pad_id)

    def global_batch(self, step: int) -> dict:
        return self.local_batch(step, 0, 1)


def train_batches(cfg: Config) -> Batches:
    t = cfg.train
    return Batches(cfg.data, cfg.data.train_split, t.seq_len, t.batch_size, shuffle=True,
                   tokenizer=tokenizer_lib.load(cfg.model.tokenizer))


def eval_batches(cfg: Config) -> Batches:
    if not cfg.data.eval_split:
        raise ConfigError("data.eval_split is empty (evaluation off); set it to a split to evaluate on")
    t = cfg.train
    return Batches(cfg.data, cfg.data.eval_split, t.seq_len, t.batch_size, shuffle=False,
                   tokenizer=tokenizer_lib.load(cfg.model.tokenizer))
