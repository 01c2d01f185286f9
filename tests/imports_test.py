"""The library's layering: no import cycle between jaxllm modules, and no import inside a function
(the usual way of hiding one)."""

import ast
import glob
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxllm")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True):
        name = "jaxllm." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        name = name[:-len(".__init__")] if name.endswith(".__init__") else name
        with open(path) as f:
            out[name] = ast.parse(f.read())
    return out


def test_no_import_cycles_and_no_imports_inside_functions():
    modules = _modules()
    graph, inner = {}, []
    for name, tree in modules.items():
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxllm"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("jaxllm"))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner += [f"{name}:{n.lineno}" for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
        # A submodule importing its own package only runs the package's __init__, not a cycle.
        graph[name] = {d for d in deps if d in modules and d != name and not name.startswith(d + ".")}
    assert not inner, f"imports inside functions: {inner}"
    state, path, cycles = {}, [], []

    def visit(u):
        state[u] = "open"
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                cycles.append(path[path.index(v):] + [v])
            elif v not in state:
                visit(v)
        state[u] = "done"
        path.pop()

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"
    assert len(modules) > 30  # the walk saw the library
