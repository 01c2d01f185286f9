"""A knowledge graph as data: (subject, relation, object) triples, their sources, an index from
entity names to facts, and whole-identifier matching of entity names in text.

Sources: a JSONL file (one {"subject", "relation", "object"} object per line), or a TFDS dataset
with those three text features prepared (array_record) under data_dir.

Entities are every subject, and every object except those of VALUE_RELATIONS (a parameter name is
a value, not a thing: `self` or `x` would otherwise match everywhere). A fact is indexed under its
subject and, unless its relation is a value relation, its object.

Matching (`mentions`): text is cut into maximal dotted identifier chains (`urllib.parse.urlsplit`);
within a chain the longest run of components that names an entity wins, scanning left to right.
So `split` never matches inside `urlsplit` or `splitext`, and in `urllib.parse` the module
`urllib.parse` matches, not a function that happens to be called `parse`; `ast.parse` gives `ast`
and `parse`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterable, NamedTuple, Sequence

from jaxllm import data
from jaxllm.config import ConfigError, DataConfig

VALUE_RELATIONS = frozenset({"takes"})
FIELDS = ("subject", "relation", "object")
# A dotted identifier chain not starting inside a longer identifier (`3abc` holds no identifier).
_CHAIN = re.compile(r"(?<![\w])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


class Triple(NamedTuple):
    subject: str
    relation: str
    object: str

    def line(self) -> str:
        return json.dumps(dict(zip(FIELDS, self)), ensure_ascii=False)


def unit_hash(triple: Triple) -> float:
    """A triple's place in [0, 1): held-out splits by it are stable when other triples change."""
    return data.unit_hash("\t".join(triple))


def is_held_out(triple: Triple, fraction: float) -> bool:
    return unit_hash(triple) < fraction


def read_jsonl(path: str) -> list[Triple]:
    """The triples of a JSONL file; a malformed line is a one-line error naming file and line."""
    triples = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number}: not JSON ({e.msg}); each line must be "
                                  '{"subject": ..., "relation": ..., "object": ...}') from None
            if not isinstance(record, dict) or any(not isinstance(record.get(k), str) or not record[k]
                                                   for k in FIELDS):
                raise ConfigError(f"{path}:{number}: needs non-empty string fields subject, relation and "
                                  f"object, got {line.strip()[:120]}")
            triples.append(Triple(*(record[k] for k in FIELDS)))
    return triples


def write_jsonl(triples: Iterable[Triple], path: str) -> None:
    """Writes atomically (a temporary file renamed), so a reader never sees half a graph."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for t in triples:
            f.write(t.line() + "\n")
    os.replace(tmp, path)


def read_tfds(cfg: DataConfig, name: str, split: str = "train") -> list[Triple]:
    """The triples of a TFDS dataset with text features subject, relation and object."""
    source, _ = data.named_source(dataclasses.replace(cfg, dataset=name, text_feature=FIELDS[0]), split,
                                  data.resolve_data_dir(cfg))
    out = []
    for i in range(len(source)):
        record = source[i]
        missing = [k for k in FIELDS if k not in record]
        if missing:
            raise ConfigError(f"TFDS dataset {name!r} has no feature(s) {missing}; a knowledge graph needs "
                              f"{', '.join(FIELDS)}")
        out.append(Triple(*(data.as_bytes(record[k]).decode("utf-8", errors="replace") for k in FIELDS)))
    return out


def load(cfg: DataConfig, spec: str) -> list[Triple]:
    """Triples from `spec`: a .jsonl path, or the name of a prepared TFDS dataset."""
    if spec.endswith(".jsonl") or os.path.isfile(spec):
        if not os.path.isfile(spec):
            raise ConfigError(f"data.kg_triples={spec}: no such file")
        return read_jsonl(spec)
    return read_tfds(cfg, spec)


class KnowledgeGraph:
    """Triples with an index from entity names to the facts about them (in triple order)."""

    def __init__(self, triples: Sequence[Triple]):
        self.triples = list(dict.fromkeys(Triple(*t) for t in triples))  # deduplicated, order kept
        self.facts: dict[str, list[Triple]] = {}
        for t in self.triples:
            self.facts.setdefault(t.subject, []).append(t)
            if t.relation not in VALUE_RELATIONS and t.object != t.subject:
                self.facts.setdefault(t.object, []).append(t)
        self.entities = frozenset(self.facts)
        # The longest entity name in components bounds the search inside a chain.
        self._max_parts = max((e.count(".") + 1 for e in self.entities), default=1)

    def mentions(self, text: str) -> list[tuple[str, int]]:
        """(entity, offset) of every whole-identifier mention in `text`, in order."""
        out = []
        for m in _CHAIN.finditer(text):
            parts, start = m.group().split("."), m.start()
            i = 0
            while i < len(parts):
                for j in range(min(len(parts), i + self._max_parts), i, -1):
                    name = ".".join(parts[i:j])
                    if name in self.entities:
                        out.append((name, start))
                        break
                else:
                    j = i + 1
                start += sum(len(p) + 1 for p in parts[i:j])
                i = j
        return out
