"""The kg_facts document transform: the facts of the entities a document mentions, fused into its
text as comment lines (valid Python, like the corpus), before it (kg_format=preamble) or after it
(appendix):

    # fact: urlsplit is defined in urllib.parse
    # fact: urlsplit takes url
    <the document>

A fact is written from the side of the entity the document mentions: triggered by its subject it
reads "subject relation object" (`urllib.parse defines urlsplit`); triggered by its object, the
relation's inverse where it has one (`urlsplit is defined in urllib.parse`), so a model reads each
fact in the direction it would be asked. The most specific entities come first (fewest facts in
the graph, then first mention), so a document naming `os` and `urlsplit` gets urlsplit's few facts
before os's hundreds; at most kg_max_facts per document; a document mentioning no entity is
returned unchanged. Triples held out by hash (kg_held_out) are never fused. The function is pure
and the token stream is cached under a key naming the options and the graph's digest, so batch t
stays a function of (seed, t).
"""

from __future__ import annotations

import hashlib

from jaxllm import data
from jaxllm.config import ConfigError, DataConfig
from jaxllm.knowledge.graph import KnowledgeGraph, Triple, is_held_out
from jaxllm.knowledge.graph import load as load_triples
from jaxllm.knowledge.stdlib_graph import stdlib_triples

FORMATS = ("preamble", "appendix")
FACT_PREFIX = "# fact: "
VERSION = 1  # part of the cache key: bump when the rendering changes
INVERSE = {"defines": "is defined in", "inherits_from": "is a base class of", "imports": "is imported by",
           "takes": "is a parameter of"}


def relation_phrase(relation: str) -> str:
    return relation.replace("_", " ")


def render(fact: Triple, entity: str) -> str:
    """One fact as a sentence seen from `entity` (its subject or its object)."""
    if entity == fact.object and fact.relation in INVERSE:
        return f"{fact.object} {INVERSE[fact.relation]} {fact.subject}"
    return f"{fact.subject} {relation_phrase(fact.relation)} {fact.object}"


def select_facts(kg: KnowledgeGraph, text: str, max_facts: int) -> list[str]:
    """The rendered facts fused into `text`: the most specific mentioned entities first."""
    first: dict[str, int] = {}
    for entity, offset in kg.mentions(text):
        first.setdefault(entity, offset)
    seen, out = set(), []
    for entity in sorted(first, key=lambda e: (len(kg.facts[e]), first[e], e)):
        for fact in kg.facts[entity]:
            if fact not in seen:
                seen.add(fact)
                out.append(render(fact, entity))
                if len(out) == max_facts:
                    return out
    return out


def fuse(text: str, facts: list[str], fmt: str) -> str:
    if not facts:
        return text
    block = "".join(f"{FACT_PREFIX}{f}\n" for f in facts)
    if fmt == "preamble":
        return f"{block}\n{text}"
    newline = "" if text.endswith("\n") else "\n"  # the block starts on a line of its own
    return f"{text}{newline}\n{block}"


def validate(cfg: DataConfig) -> None:
    data.DOCUMENT_TRANSFORMS.check(cfg.transform, allowed_extra=("",))
    if cfg.kg_format not in FORMATS:
        raise ConfigError(f"data.kg_format={cfg.kg_format!r}; choose one of {', '.join(FORMATS)}")
    if cfg.kg_max_facts < 1:
        raise ConfigError(f"data.kg_max_facts={cfg.kg_max_facts} must be at least 1")
    if not 0.0 <= cfg.kg_held_out < 1.0:
        raise ConfigError(f"data.kg_held_out={cfg.kg_held_out} must be in [0, 1)")


def graph_triples(cfg: DataConfig) -> tuple[list[Triple], str]:
    """All triples of the configured graph (held-out ones included) and the digest of their text."""
    triples = load_triples(cfg, cfg.kg_triples) if cfg.kg_triples else stdlib_triples(cfg)
    digest = hashlib.sha256("\n".join(t.line() for t in triples).encode()).hexdigest()[:16]
    return triples, digest


def fused_graph(cfg: DataConfig, triples: list[Triple]) -> KnowledgeGraph:
    return KnowledgeGraph([t for t in triples if not is_held_out(t, cfg.kg_held_out)])


@data.DOCUMENT_TRANSFORMS.register("kg_facts")
def kg_facts(cfg: DataConfig) -> data.Transform:
    validate(cfg)
    triples, digest = graph_triples(cfg)
    kg = fused_graph(cfg, triples)
    fmt, max_facts = cfg.kg_format, cfg.kg_max_facts

    def fn(text: str) -> str:
        return fuse(text, select_facts(kg, text, max_facts), fmt)

    return data.Transform(fn, f"kg_facts-v{VERSION}-{fmt}-{max_facts}-{cfg.kg_held_out!r}-{digest}")
