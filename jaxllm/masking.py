"""BERT's masked-LM data: packed rows of a text split (data.py) with tokens chosen and corrupted.

Of the maskable tokens of a row (not padding, not a special token), each is chosen with
probability mlm.rate (with mlm.whole_word, each word is, and all its tokens with it); a chosen
token becomes [MASK] with probability mlm.mask_fraction, a uniformly random token with
mlm.random_fraction, and stays itself otherwise. The model predicts every chosen token's original
id; the loss is on those only.

Batch format: inputs (corrupted), targets (original ids), segment_ids, positions int32 [B, L],
weights float32 [B, L] (1 on the chosen tokens). The choice in row r of batch t is a pure function
of (seed, split, t, r), so a resumed run, any process split and every evaluation see the same
masks; the validation split's rows are in file order, so its masking is fixed.
"""

from __future__ import annotations

import zlib

import numpy as np

from jaxllm import data
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.config import Config, ConfigError, MaskedLMConfig
from jaxllm.tokenizer import BYTES, Tokenizer


def check(cfg: MaskedLMConfig) -> None:
    if not 0 < cfg.rate < 1:
        raise ConfigError(f"mlm.rate={cfg.rate} must be in (0, 1)")
    if min(cfg.mask_fraction, cfg.random_fraction) < 0 or cfg.mask_fraction + cfg.random_fraction > 1:
        raise ConfigError(f"mlm.mask_fraction={cfg.mask_fraction} and mlm.random_fraction={cfg.random_fraction} "
                          "must be >= 0 and add up to at most 1")


def special_ids(tok: Tokenizer) -> np.ndarray:
    return np.array(sorted({i for i in (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id, tok.cls_id, tok.sep_id)
                            if i is not None}), np.int64)


def word_starts(inputs_RL, segment_ids_RL, joins_left_V, joins_right_V) -> np.ndarray:
    """bool [R, L]: where a new word starts (a token that does not continue the one before it)."""
    continues = np.zeros(inputs_RL.shape, bool)
    continues[:, 1:] = (joins_left_V[inputs_RL[:, 1:]] & joins_right_V[inputs_RL[:, :-1]]
                        & (segment_ids_RL[:, 1:] == segment_ids_RL[:, :-1]))
    return ~continues


def mask_tokens(tokens_RL, segment_ids_RL, rngs, cfg: MaskedLMConfig, *, mask_id: int, random_ids: int,
                specials: np.ndarray, pieces=None) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted inputs int32 [R, L], chosen float32 [R, L]) of token rows, one numpy Generator
    per row. `random_ids`: random replacements are drawn from 0..random_ids-1; `pieces`:
    (joins_left, joins_right) tables for whole-word masking (None: token by token)."""
    tokens_RL = np.asarray(tokens_RL, np.int64)
    R, L = tokens_RL.shape
    maskable = (segment_ids_RL != 0) & ~np.isin(tokens_RL, specials)
    if pieces is not None:
        starts = word_starts(tokens_RL, segment_ids_RL, *pieces)
        word_RL = np.cumsum(starts, axis=1) - 1  # the word index of each token in its row
    inputs, chosen = tokens_RL.copy(), np.zeros((R, L), bool)
    for r, rng in enumerate(rngs):
        if pieces is not None:
            picked = (rng.random(L) < cfg.rate)[word_RL[r]]  # one draw per word (at most L words)
        else:
            picked = rng.random(L) < cfg.rate
        action = rng.random(L)
        replacement = rng.integers(0, random_ids, L)
        chosen[r] = picked & maskable[r]
        to_mask = chosen[r] & (action < cfg.mask_fraction)
        to_random = chosen[r] & (action >= cfg.mask_fraction) & (action < cfg.mask_fraction + cfg.random_fraction)
        inputs[r] = np.where(to_mask, mask_id, np.where(to_random, replacement, inputs[r]))
    return inputs.astype(np.int32), chosen.astype(np.float32)


class MaskedBatches(data.Batches):
    """Packed rows of a text split, masked for BERT's objective (see the module docstring)."""

    def __init__(self, cfg: Config, split: str, shuffle: bool):
        tok = tokenizer_lib.load(cfg.model.tokenizer)
        check(cfg.mlm)
        if tok.mask_id is None:
            raise ConfigError(f"model.tokenizer={cfg.model.tokenizer} has no mask token; masked-LM training needs "
                              "one (mask_token in its tokenizer_config.json)")
        if not tok.mask_id < cfg.model.vocab_size:
            raise ConfigError(f"the mask token id {tok.mask_id} is outside model.vocab_size={cfg.model.vocab_size}")
        super().__init__(cfg.data, split, cfg.train.seq_len, cfg.train.batch_size, shuffle=shuffle, tokenizer=tok)
        self.mlm, self.mask_id, self.specials = cfg.mlm, tok.mask_id, special_ids(tok)
        # The byte tokenizer's random replacements are bytes; another's any id it has (as BERT).
        self.random_ids = 256 if tok is BYTES else tok.vocab_size
        self.pieces = None
        if cfg.mlm.whole_word:
            if tok.word_pieces is None:
                raise ConfigError(f"mlm.whole_word: model.tokenizer={cfg.model.tokenizer} does not say where words start")
            size = max(cfg.model.vocab_size, tok.vocab_size) + 1
            self.pieces = tuple(np.pad(t, (0, size - len(t))) for t in tok.word_pieces())
        self.salt = zlib.crc32(split.encode())

    def _mask(self, rows: dict, step: int, lo: int) -> dict:
        rngs = [np.random.default_rng((self.seed, self.salt, step, lo + r)) for r in range(len(rows["inputs"]))]
        inputs, chosen = mask_tokens(rows["inputs"], rows["segment_ids"], rngs, self.mlm, mask_id=self.mask_id,
                                     random_ids=self.random_ids, specials=self.specials, pieces=self.pieces)
        return {"inputs": inputs, "targets": rows["inputs"], "segment_ids": rows["segment_ids"],
                "positions": rows["positions"], "weights": chosen}

    def batch_rows(self, step: int, lo: int, hi: int) -> dict:
        return self._mask(super().batch_rows(step, lo, hi), step, lo)

    def local_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> dict:
        lo = process_index * (self.batch_size // process_count)
        return self._mask(super().local_batch(step, process_index, process_count), step, lo)


def train_batches(cfg: Config) -> MaskedBatches:
    return MaskedBatches(cfg, cfg.data.train_split, shuffle=True)


def eval_batches(cfg: Config) -> MaskedBatches:
    if not cfg.data.eval_split:
        raise ConfigError("data.eval_split is empty (evaluation off); set it to a split to evaluate on")
    return MaskedBatches(cfg, cfg.data.eval_split, shuffle=False)
