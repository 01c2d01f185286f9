"""What a compiled program says about itself: each collective kind's count and bytes per step in its
HLO, loops unrolled by their trip counts (a scanned layer body runs once per layer), and XLA's cost
analysis."""

from __future__ import annotations

import collections
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 0.5, "u4": 0.5,
                "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_WHILE = re.compile(r"\bwhile\(.*?condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_CONSTANT = re.compile(r"s32\[\]\S* constant\((\d+)\)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLS = re.compile(r"\b(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")


def _bytes(shape_text: str) -> float:
    """Bytes of an HLO result type; a tuple (async start ops carry operands and results) counts
    its last element, the result."""
    shapes = _SHAPE.findall(shape_text)
    if not shapes:
        return 0.0
    dtype, dims = shapes[-1]
    count = 1
    for d in dims.split(","):
        count *= int(d) if d else 1
    return count * _DTYPE_BYTES[dtype]


def _trip_count(while_line: str, condition: list[str]) -> int:
    """A loop's trip count: XLA's annotation, else the bound its condition compares the counter
    with (a scan's `i < n`), else 1."""
    known = _TRIP.search(while_line)
    if known:
        return int(known.group(1))
    bounds = [int(c) for line in condition for c in _CONSTANT.findall(line)]
    return max(bounds) if bounds else 1


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{kind: {"count": per step, "bytes": per step and device, "in_loops": ops inside loop
    bodies}} from the text of a compiled (per-device, SPMD-partitioned) module."""
    bodies: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            bodies[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None:
            bodies[current].append(line)
    # How many times each computation runs per step: while bodies by their trip counts.
    runs: dict[str, int] = collections.defaultdict(int)
    in_loop: set[str] = set()

    def visit(name: str, times: int, looped: bool, depth: int = 0):
        if name not in bodies or depth > 64:
            return
        runs[name] += times
        if looped:
            in_loop.add(name)
        for line in bodies[name]:
            loop = _WHILE.search(line)
            if loop:  # its condition holds no collectives
                visit(loop.group(2), times * _trip_count(line, bodies.get(loop.group(1), [])), True, depth + 1)
                continue
            for callee in _CALLS.findall(line):
                visit(callee, times, looped, depth + 1)

    if entry is not None:
        visit(entry, 1, False)
    totals = {k: {"count": 0, "bytes": 0.0, "in_loops": 0} for k in COLLECTIVES}
    for name, lines in bodies.items():
        for line in lines:
            m = _OP.search(line)
            if not m:
                continue
            kind = m.group(2)
            times = runs.get(name, 0)
            totals[kind]["count"] += times
            totals[kind]["bytes"] += times * _bytes(m.group(1))
            totals[kind]["in_loops"] += int(name in in_loop)
    return {k: v for k, v in totals.items() if v["count"]}


def cost(compiled) -> dict[str, float]:
    """XLA's cost analysis of a compiled program, per device: flops, bytes accessed, seconds."""
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0)),
            "seconds": float(c.get("optimal_seconds", 0.0))}
