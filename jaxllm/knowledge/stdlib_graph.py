"""The embedded knowledge graph: triples extracted with `ast` from the standard-library corpus
(data.dataset=python_stdlib), written once as JSONL next to the corpus's TFDS files.

Relations (module names are dotted: urllib/parse.py is `urllib.parse`, a package's __init__.py
is the package):
  (module, "defines", name)         every function and class defined at the module's top level
  (class, "inherits_from", base)    each base of a top-level class that is a name or dotted name,
                                    as written (`socketserver.TCPServer`)
  (function, "takes", parameter)    every parameter of a top-level function, in signature order
  (module, "imports", module)       every `import a.b` and `from a.b import c` anywhere in the
                                    module, relative imports resolved against its package
A file that does not parse is skipped. The order is file path, then source order, so the file is
the same on every build.
"""

from __future__ import annotations

import ast
import os
import warnings

from jaxllm import data
from jaxllm.config import DataConfig
from jaxllm.knowledge.graph import Triple, read_jsonl, write_jsonl

FORMAT = 1  # part of the file name: bump when the extraction changes


def module_name(rel_path: str) -> str:
    """`urllib/parse.py` -> `urllib.parse`; `urllib/__init__.py` -> `urllib`."""
    parts = rel_path[:-3].replace(os.sep, "/").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute module of `from <level dots><target> import ...` written in `module`."""
    if level == 0:
        return target or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    parts = parts[:len(parts) - (level - 1)] if level > 1 else parts
    return ".".join([*parts, *([target] if target else [])])


def extract_triples(source: str, module: str, is_package: bool = False) -> list[Triple]:
    """The triples of one module's source (see the module docstring); [] if it does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences and the like in old files
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append(Triple(module, "defines", node.name))
        if isinstance(node, ast.ClassDef):
            out += [Triple(node.name, "inherits_from", ast.unparse(b)) for b in node.bases
                    if isinstance(b, (ast.Name, ast.Attribute))]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            params = [*a.posonlyargs, *a.args, *([a.vararg] if a.vararg else []), *a.kwonlyargs,
                      *([a.kwarg] if a.kwarg else [])]
            out += [Triple(node.name, "takes", p.arg) for p in params]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [_resolve(module, is_package, node.level, node.module)]
        else:
            continue
        out += [Triple(module, "imports", n) for n in names if n and n != module]
    return list(dict.fromkeys(out))


def corpus_triples(documents: list[tuple[str, str]]) -> list[Triple]:
    """The triples of (relative path, source) pairs, in path order."""
    out = []
    for rel, text in sorted(documents):
        out += extract_triples(text, module_name(rel), os.path.basename(rel) == "__init__.py")
    return list(dict.fromkeys(out))


def stdlib_triples_path(cfg: DataConfig) -> str:
    """The embedded graph's JSONL file, built on first use next to the stdlib corpus (which is built
    first if needed); concurrent builders wait for one another."""
    builder = data.stdlib_builder(data.resolve_data_dir(cfg), cfg.eval_fraction)
    path = os.path.join(str(builder.data_path), f"jaxllm_triples-v{FORMAT}.jsonl")
    if not os.path.exists(path):
        with data.file_lock(path + ".lock"):
            if not os.path.exists(path):
                documents = []
                for split in sorted(builder.info.splits.keys()):
                    source = builder.as_data_source(split=split)
                    for i in range(len(source)):
                        record = source[i]
                        documents.append((data.as_bytes(record["path"]).decode(),
                                          data.as_bytes(record["text"]).decode("utf-8", errors="replace")))
                write_jsonl(corpus_triples(documents), path)
    return path


def stdlib_triples(cfg: DataConfig) -> list[Triple]:
    return read_jsonl(stdlib_triples_path(cfg))
