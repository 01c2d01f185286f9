"""Task lookup, evaluation and reporting around lm_eval.simple_evaluate: the embedded tasks
(tasks/) are always on the include path; a name that no task, group or tag has is a ConfigError
naming the closest ones."""

from __future__ import annotations

import difflib
import json
import os
from typing import Sequence

import lm_eval
from lm_eval import utils as lm_utils
from lm_eval.tasks import TaskManager

from jaxllm.config import ConfigError

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
EMBEDDED_TAG = "jaxllm_stdlib"


def task_manager(names: Sequence[str], include_paths: Sequence[str] = ()) -> TaskManager:
    """A TaskManager that knows every name: the embedded tasks and those under `include_paths`
    alone when they have them all (indexing lm-eval's ~15k task files takes seconds), else lm-eval's
    own too. A name that none has is a ConfigError naming the closest; names starting "jaxllm_"
    are looked for among the embedded tasks only."""
    if not names:
        raise ConfigError("--tasks names no task")
    for path in include_paths:
        if not os.path.isdir(path):
            raise ConfigError(f"--include_path {path} is not a directory of task YAML files")
    paths = [TASKS_DIR, *[os.path.abspath(p) for p in include_paths]]
    manager = TaskManager(include_path=paths, include_defaults=False)
    missing = unknown(manager, names)
    if any(not n.startswith("jaxllm_") for n in missing):
        manager = TaskManager(include_path=paths)
        missing = unknown(manager, names)
    if missing:
        close = difflib.get_close_matches(missing[0], manager.all_tasks, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else (
            f"; the embedded tasks are {', '.join(embedded_tasks(manager))}, and --include_path adds others")
        raise ConfigError(f"no lm-eval task, group or tag named {missing[0]!r}{hint}")
    return manager


def unknown(manager: TaskManager, names: Sequence[str]) -> list[str]:
    """The names no task, group or tag of `manager` has (or, as a pattern, matches)."""
    known = set(manager.all_tasks)
    return [n for n in names if n not in known and not manager.match_tasks([n])]


def embedded_tasks(manager: TaskManager) -> list[str]:
    return [t for t in manager.all_tasks if t.startswith("jaxllm_")]


def evaluate(lm, names: Sequence[str], manager: TaskManager, limit=None, num_fewshot: int | None = None,
             bootstrap_iters: int = 1000, seed: int = 0) -> dict:
    """lm_eval.simple_evaluate's results dict (without per-sample logs)."""
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(names), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters, log_samples=False, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=None, fewshot_random_seed=seed)


def results_json(results: dict) -> str:
    return json.dumps(results, indent=2, default=lm_utils.handle_non_serializable, ensure_ascii=False)


def summary_line(workdirs: Sequence[str], limit, num_fewshot, batch_size: int) -> str:
    """The line lm-eval's command prints above its tables."""
    return (f"jaxllm (workdir={'|'.join(workdirs)}), gen_kwargs: (None), limit: {limit}, "
            f"num_fewshot: {num_fewshot}, batch_size: {batch_size}")


def tables(results: dict) -> str:
    out = lm_utils.make_table(results)
    if "groups" in results:
        out += "\n" + lm_utils.make_table(results, "groups")
    return out
