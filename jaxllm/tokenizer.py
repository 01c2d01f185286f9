"""Tokenizers: the byte tokenizer (ids 0-255 are the UTF-8 bytes, then PAD, BOS, EOS) and any
Hugging Face `tokenizer.json`, read with the `tokenizers` library. `model.tokenizer` selects one:
"bytes", or the path of a tokenizer.json or of a directory holding one (an imported model's
workdir keeps its tokenizer files next to config.json).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from typing import Callable

import numpy as np
import tokenizers

from jaxllm.config import ConfigError

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
NUM_TOKEN_IDS = 259
# The byte tokenizer's [MASK] for masked-LM training: the first id past the bytes' own, inside the
# default vocabulary of 384 (its documents' BOS and EOS play [CLS] and [SEP]; it has no ids of its own for them).
MASK_ID = 259
_WORD_BYTES = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz", np.uint8)


def encode(text: str | bytes) -> np.ndarray:
    """UTF-8 bytes of `text` as int32 ids 0..255 (no BOS/EOS). Bytes that were not UTF-8 and came
    in surrogate-escaped (as Python passes them from a command line) are those bytes again."""
    data = text.encode("utf-8", errors="surrogateescape") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, np.uint8).astype(np.int32)


def decode(ids) -> str:
    """Inverse of `encode`; drops PAD/BOS/EOS and out-of-range ids, replaces invalid UTF-8."""
    ids = np.asarray(ids).reshape(-1)
    ids = ids[(ids >= 0) & (ids < 256)]
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """encode(text) -> int32 ids without special tokens; decode(ids) -> text without them. Any
    special id may be None when the tokenizer has none (then padding uses `pad_or_eos`)."""

    name: str
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    encode: Callable[[str], np.ndarray]
    decode: Callable[..., str]
    token_bytes: Callable[[], np.ndarray] | None = None  # float32 [vocab_size]: UTF-8 bytes per id
    # Masked-LM and encoder specials (BERT's [MASK], [CLS], [SEP]); None where the tokenizer has none.
    mask_id: int | None = None
    cls_id: int | None = None
    sep_id: int | None = None
    # () -> (joins_left, joins_right), bool [vocab_size]: a token joins_left if it continues a word
    # when the token before it joins_right (whole-word masking groups such runs into one word).
    word_pieces: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def pad_or_eos(self) -> int:
        return self.pad_id if self.pad_id is not None else (self.eos_id if self.eos_id is not None else 0)


# Every byte-level token counts as one byte (EOS too), so bits per byte is the loss in bits.
def _byte_word_pieces() -> tuple[np.ndarray, np.ndarray]:
    word = np.zeros(NUM_TOKEN_IDS + 1, bool)
    word[_WORD_BYTES] = True  # a word is a run of [A-Za-z0-9_] bytes
    return word, word


BYTES = Tokenizer("bytes", NUM_TOKEN_IDS, BOS_ID, EOS_ID, PAD_ID, encode, decode,
                  lambda: np.ones(NUM_TOKEN_IDS, np.float32), mask_id=MASK_ID, word_pieces=_byte_word_pieces)


_SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "mask_token", "cls_token", "sep_token")


def _special_id(hf_tokenizer, config: dict, name: str) -> int | None:
    token = config.get(name)
    if isinstance(token, dict):
        token = token.get("content")
    return None if token is None else hf_tokenizer.token_to_id(token)


@functools.lru_cache(maxsize=8)
def _load_hf(path: str) -> Tokenizer:
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise ConfigError(f"model.tokenizer={path}: no tokenizer.json there; give the file, a directory "
                          "holding one, or 'bytes'")
    hf = tokenizers.Tokenizer.from_file(file)
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        extra = os.path.join(os.path.dirname(file), name)
        if os.path.exists(extra):
            with open(extra) as f:
                config.update({k: v for k, v in json.load(f).items() if k in _SPECIAL_NAMES})
    specials = {i for i in (_special_id(hf, config, n) for n in _SPECIAL_NAMES) if i is not None}
    return Tokenizer(
        name=file, vocab_size=hf.get_vocab_size(with_added_tokens=True),
        bos_id=_special_id(hf, config, "bos_token"), eos_id=_special_id(hf, config, "eos_token"),
        pad_id=_special_id(hf, config, "pad_token"),
        encode=lambda text: np.asarray(hf.encode(text, add_special_tokens=False).ids, np.int32),
        decode=lambda ids: hf.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True),
        token_bytes=lambda: _token_bytes(hf, specials),
        mask_id=_special_id(hf, config, "mask_token"), cls_id=_special_id(hf, config, "cls_token"),
        sep_id=_special_id(hf, config, "sep_token"), word_pieces=lambda: _word_pieces(hf, specials),
    )


def _word_pieces(hf, specials: set[int]) -> tuple[np.ndarray, np.ndarray]:
    """WordPiece: a "##" token continues the word before it. Byte-level BPE and SentencePiece: a
    token starting with a word character and no space marker ('Ġ', '▁') continues a token that
    ends with one."""
    size = hf.get_vocab_size(with_added_tokens=True)
    joins_left, joins_right = np.zeros(size, bool), np.zeros(size, bool)
    wordpiece = json.loads(hf.to_str()).get("model", {}).get("type") == "WordPiece"
    for token, i in hf.get_vocab(with_added_tokens=True).items():
        if i in specials or not token:
            continue
        if wordpiece:
            joins_left[i], joins_right[i] = token.startswith("##"), True
        else:
            joins_left[i] = token[0] not in "\u0120\u2581" and (token[0].isalnum() or token[0] == "_")
            joins_right[i] = token[-1].isalnum() or token[-1] == "_"
    return joins_left, joins_right


def _token_bytes(hf, specials: set[int]) -> np.ndarray:
    """UTF-8 bytes of every id's text: a byte-level BPE token is one byte per character of its
    vocabulary string; a SentencePiece-style one is its text with '▁' as a space, and a byte-fallback
    token <0xNN> one byte. Special tokens count zero."""
    byte_level = "ByteLevel" in json.dumps(json.loads(hf.to_str()).get("decoder"))
    sizes = np.zeros(hf.get_vocab_size(with_added_tokens=True), np.float32)
    for token, i in hf.get_vocab(with_added_tokens=True).items():
        if i in specials:
            continue
        if byte_level:
            sizes[i] = len(token)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            sizes[i] = 1
        else:
            sizes[i] = len(token.replace("\u2581", " ").encode("utf-8"))
    return sizes


def load(spec: str) -> Tokenizer:
    """The tokenizer `model.tokenizer` names."""
    return BYTES if spec == "bytes" else _load_hf(os.path.abspath(spec))


def fingerprint(spec: str) -> str:
    """What identifies a tokenizer: "bytes", or the digest of its tokenizer.json (the same file
    copied into another run directory is the same tokenizer)."""
    if spec == "bytes":
        return spec
    with open(load(spec).name, "rb") as f:
        return "sha256:" + hashlib.sha256(f.read()).hexdigest()[:16]


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """A prompt's ids: BOS (when the tokenizer has one), then the text."""
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return bos + tokenizer.encode(text).tolist()
