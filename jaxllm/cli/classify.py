"""Classify texts with a trained classifier run (family "classifier"): the predicted class and
every class's probability.

    python -m jaxllm.classify --workdir runs/classify_stdlib --text "import asyncio" [--text ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

import jax
import numpy as np

from jaxllm import labelled, restore
from jaxllm import tokenizer as tokenizer_lib
from jaxllm.config import ConfigError
from jaxllm.models import MODELS


def classify(workdir: str, texts: Sequence[str]) -> list[dict]:
    cfg, params = restore.load_params(workdir)
    if cfg.family != "classifier":
        raise ConfigError(f"{workdir} is a {cfg.family} run, not a classifier; train one with family=classifier")
    names = cfg.data.classes or labelled.class_names(cfg)  # runs keep their class names in their config
    tok = tokenizer_lib.load(cfg.model.tokenizer)
    L = cfg.train.seq_len
    rows = [labelled.example_ids(tok, tok.encode(t), L) for t in texts]
    inputs = np.full((len(rows), L), tok.pad_or_eos, np.int32)
    segment_ids = np.zeros((len(rows), L), np.int32)
    for i, ids in enumerate(rows):
        inputs[i, :len(ids)], segment_ids[i, :len(ids)] = ids, 1
    positions = np.where(segment_ids > 0, np.arange(L), 0).astype(np.int32)
    model = MODELS.get(cfg.family).build(cfg)
    logits = jax.jit(model.apply)({"params": params}, inputs, segment_ids, positions)
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    return [{"text": t, "class": names[int(p.argmax())], "probabilities": dict(zip(names, p.round(4).tolist()))}
            for t, p in zip(texts, probs)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Classify texts with a jaxllm classifier run.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--text", action="append", required=True, help="repeat for several texts")
    args = parser.parse_args(argv)
    try:
        results = classify(args.workdir, args.text)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
