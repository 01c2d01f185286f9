"""Writes the embedded lm-eval tasks' data (jaxllm/evaluation/tasks/data/*.jsonl, committed) from
what the project already has: the standard-library knowledge graph's QA facts and the held-out
(validation-split) files of the stdlib corpus, which no run trains on.

    python -m jaxllm.evaluation.build_tasks          # rewrites the files; deterministic

  stdlib_qa.jsonl        the questions of `python -m jaxllm.qa` (knowledge/qa.py, default data
                         options): question, answer, and four choices (the answer and three other
                         answers of the same relation, picked by hash)
  stdlib_next_line.jsonl a held-out line and up to CONTEXT_CHARS of the lines before it
  stdlib_text.jsonl      held-out source cut at line ends into pieces of about PIECE_CHARS
"""

from __future__ import annotations

import hashlib
import json
import os

from jaxllm import data
from jaxllm.config import DataConfig
from jaxllm.knowledge import qa

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
DATA_DIR = os.path.join(TASKS_DIR, "data")
NUM_CHOICES = 4
NEXT_LINES = 200
CONTEXT_CHARS = 160
PIECES = 40
PIECE_CHARS = 1500
# The standard library of the Python that built the committed files; another version's corpus
# gives other held-out files, so the files are not rebuilt on the fly.
SOURCE_NOTE = "python_stdlib validation split (data.split_files, eval_fraction 0.05)"


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def qa_records() -> list[dict]:
    questions = qa.questions(DataConfig())
    by_relation: dict[str, list[str]] = {}
    for q in questions:
        by_relation.setdefault(q.fact.relation, [])
        if q.answer not in by_relation[q.fact.relation]:
            by_relation[q.fact.relation].append(q.answer)
    out = []
    for q in questions:
        others = sorted((a for a in by_relation[q.fact.relation] if a != q.answer),
                        key=lambda a: _hash(q.entity + "|" + a))[:NUM_CHOICES - 1]
        choices = sorted([q.answer, *others], key=lambda a: _hash(q.entity + "#" + a))
        out.append({"question": q.prompt("question"), "entity": q.entity, "relation": q.fact.relation,
                    "answer": q.answer, "choices": choices, "gold": choices.index(q.answer)})
    return out


def held_out_sources() -> list[tuple[str, str]]:
    root, files = data.stdlib_files()
    held_out = data.split_files(files, DataConfig().eval_fraction).get("validation", [])
    out = []
    for rel in held_out:
        with open(os.path.join(root, rel), "rb") as f:
            out.append((rel, f.read().decode("utf-8", errors="replace")))
    return out


def next_line_records(sources: list[tuple[str, str]]) -> list[dict]:
    """Lines of 20-80 characters with at least 3 lines before them, the most by hash."""
    candidates = []
    for rel, text in sources:
        lines = text.splitlines(keepends=True)
        for i in range(3, len(lines)):
            line = lines[i]
            if 20 <= len(line.strip()) <= 80 and line.endswith("\n") and line.strip()[0] != "#":
                context = "".join(lines[:i])[-CONTEXT_CHARS:]
                candidates.append((_hash(f"{rel}:{i}"), {"path": rel, "line": i + 1, "context": context,
                                                         "target": line}))
    return [r for _, r in sorted(candidates, key=lambda c: c[0])[:NEXT_LINES]]


def text_records(sources: list[tuple[str, str]]) -> list[dict]:
    pieces = []
    for rel, text in sources:
        piece, start = "", 1
        for n, line in enumerate(text.splitlines(keepends=True), 1):
            piece += line
            if len(piece) >= PIECE_CHARS:
                pieces.append((_hash(f"{rel}:{start}"), {"path": rel, "first_line": start, "text": piece}))
                piece, start = "", n + 1
    return [r for _, r in sorted(pieces, key=lambda c: c[0])[:PIECES]]


def write(name: str, records: list[dict]) -> None:
    os.makedirs(DATA_DIR, exist_ok=True)
    with open(os.path.join(DATA_DIR, name), "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    print(f"{name}: {len(records)} records")


def main() -> None:
    sources = held_out_sources()
    write("stdlib_qa.jsonl", qa_records())
    write("stdlib_next_line.jsonl", next_line_records(sources))
    write("stdlib_text.jsonl", text_records(sources))


if __name__ == "__main__":
    main()
