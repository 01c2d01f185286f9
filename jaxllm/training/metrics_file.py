"""A run's metrics.jsonl, one JSON object per line, appended by the training loop. A run killed in the
middle of a write leaves its last line cut short: every reader skips such a line with a warning,
and a resumed run cuts it off before appending, so the file is valid JSONL again.

No JAX here: plots and benchmarks read metrics without starting a backend.
"""

from __future__ import annotations

import json
import os
import sys

METRICS_FILE = "metrics.jsonl"


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, METRICS_FILE)


def _parse(path: str) -> tuple[list[tuple[dict, bytes]], list[str], bool]:
    """([(record, its line)], what was skipped, whether the file needs rewriting to be valid)."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    tail = lines.pop()  # the bytes after the last newline: empty unless the last write was cut short
    parsed, skipped = [], []
    for number, line in enumerate(lines + [tail], start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            record = None
        if isinstance(record, dict):
            parsed.append((record, line.strip() + b"\n"))
        else:
            skipped.append(f"line {number} ({'cut short' if number > len(lines) else 'not a JSON object'})")
    return parsed, skipped, bool(skipped or tail.strip())


def _warn(path: str, skipped: list[str], action: str) -> None:
    if skipped:
        print(f"warning: {path}: {action} {', '.join(skipped)}; a run killed while writing leaves a "
              "partial last line", file=sys.stderr)


def read_records(path: str) -> list[dict]:
    """The file's records in order; lines that are not JSON objects (a partial last line) are
    skipped with a warning."""
    parsed, skipped, _ = _parse(path)
    _warn(path, skipped, "skipped")
    return [record for record, _ in parsed]


def keep_through(path: str, step: int) -> None:
    """Before a run resumes at `step`: drops the records past it (the run writes them again, so the
    file keeps one per step) and any partial line, in one atomic rewrite."""
    if not os.path.exists(path):
        return
    parsed, skipped, broken = _parse(path)
    kept = [line for record, line in parsed if record.get("step", 0) <= step]
    if broken or len(kept) != len(parsed):
        _warn(path, skipped, "removed")
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.writelines(kept)
        os.replace(tmp, path)
