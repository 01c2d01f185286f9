"""The cost of the kg_facts transform in the data pipeline, side by side with the plain pipeline in
one run (the two alternate, each going first in every other round; medians reported). One JSON object.

    python benchmarks/knowledge.py [--rounds 5] [--batches 50]

- stream_build_s: building the train split's token stream from the TFDS corpus (read, transform,
  tokenize, write the .npy cache), in a fresh data_dir holding a copy of the built corpus so that
  nothing is cached; the transform runs here, once per config.
- batches_per_s: tiny_lm's batches (16 x 256) once the stream is cached, global_batch(t) for
  `--batches` consecutive steps (what the training loop pays every step), three passes a round.
- The transform's options are knowledge_tiny_lm's (preamble, 16 facts, 30 % held out).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, os.path.join(REPO, "experiments"))

from knowledge_tiny_lm import get_config  # noqa: E402
from train_throughput import machine_info  # noqa: E402

from jaxllm import data  # noqa: E402
from jaxllm import knowledge  # noqa: E402, F401  (registers kg_facts)
from jaxllm.knowledge import stdlib_graph  # noqa: E402


def copy_corpus(src_data_dir: str, dst_data_dir: str) -> None:
    """The built TFDS corpus (and its triples) without any cached token stream."""
    shutil.copytree(os.path.join(src_data_dir, "jaxllm_text_files"), os.path.join(dst_data_dir, "jaxllm_text_files"),
                    ignore=shutil.ignore_patterns("jaxllm_tokens*", "jaxllm_starts*", "*.lock"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()
    cfg = get_config()
    augmented = cfg.data
    plain = dataclasses.replace(augmented, transform="")
    stdlib_graph.stdlib_triples_path(augmented)  # the corpus and the graph exist before timing
    src = data.resolve_data_dir(augmented)
    build: dict[str, list[float]] = {"plain": [], "kg_facts": []}
    speed: dict[str, list[float]] = {"plain": [], "kg_facts": []}
    sizes = {}
    pairs = [("plain", plain), ("kg_facts", augmented)]
    for r in range(args.rounds):
        for name, dcfg in pairs if r % 2 == 0 else pairs[::-1]:  # neither always goes first
            with tempfile.TemporaryDirectory() as tmp:
                copy_corpus(src, tmp)
                local = dataclasses.replace(dcfg, data_dir=tmp)
                start = time.perf_counter()
                tokens, starts = data.token_stream(local, cfg.data.train_split)
                build[name].append(time.perf_counter() - start)
                sizes[name] = {"tokens": len(tokens), "documents": len(starts)}
                assert glob.glob(os.path.join(tmp, "**", "jaxllm_tokens-*.npy"), recursive=True)
                batches = data.Batches(local, cfg.data.train_split, cfg.train.seq_len, cfg.train.batch_size)
                batches.global_batch(0)
                for _ in range(3):  # the first pass also pages the new stream in
                    start = time.perf_counter()
                    for t in range(args.batches):
                        batches.global_batch(t)
                    speed[name].append(args.batches / (time.perf_counter() - start))
                del tokens, batches
    print(json.dumps({
        "benchmark": "knowledge_transform",
        "rounds": args.rounds,
        "batch": [cfg.train.batch_size, cfg.train.seq_len],
        "transform": {k: getattr(augmented, k) for k in ("kg_format", "kg_max_facts", "kg_held_out")},
        "stream_build_s_median": {k: round(statistics.median(v), 3) for k, v in build.items()},
        "batches_per_s_median": {k: round(statistics.median(v), 1) for k, v in speed.items()},
        "batches_per_s_range": {k: [round(min(v)), round(max(v))] for k, v in speed.items()},
        "stream": sizes,
        "machine": machine_info(),
    }))


if __name__ == "__main__":
    main()
