"""Knowledge-augmented training: a knowledge graph as data (graph.py), the embedded graph of the
standard library (stdlib_graph.py), and the kg_facts document transform that fuses facts into the
training text (fusion.py). Importing the package registers kg_facts in data.DOCUMENT_TRANSFORMS.
The question-answering evaluation is jaxllm/knowledge/qa.py (it restores runs, so it sits above
this package's import)."""

from jaxllm.data import DOCUMENT_TRANSFORMS
from jaxllm.knowledge import fusion, graph, stdlib_graph  # noqa: F401  (fusion registers kg_facts)
from jaxllm.knowledge.fusion import validate
from jaxllm.knowledge.graph import KnowledgeGraph, Triple

__all__ = ["DOCUMENT_TRANSFORMS", "KnowledgeGraph", "Triple", "validate"]
