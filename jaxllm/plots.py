"""Run comparison plots: training and validation curves of several runs from their metrics.jsonl,
against steps and against training tokens (steps x batch_size x seq_len from each run's
config.json), one line per run, written as a PNG with matplotlib's headless Agg backend.

    plots.plot_runs(["runs/tiny_lm", "runs/moe_tiny"], "moe_vs_dense.png")
"""

from __future__ import annotations

import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on a training host

import matplotlib.pyplot as plt  # noqa: E402

from jaxllm.config import ConfigError, read_config_json  # noqa: E402
from jaxllm.training import metrics_file  # noqa: E402

X_AXES = ("step", "tokens")


def read_metrics(workdir: str) -> list[dict]:
    """The run's logged records, one per step (the last one where a step appears twice); a line
    cut short by a killed run is skipped with a warning."""
    path = metrics_file.metrics_path(workdir)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a jaxllm run directory with metrics")
    by_step = {int(record["step"]): record for record in metrics_file.read_records(path) if "step" in record}
    return [by_step[s] for s in sorted(by_step)]


def tokens_per_step(workdir: str) -> int:
    train = read_config_json(workdir).get("train", {})
    return int(train.get("batch_size", 0)) * int(train.get("seq_len", 0))


def curves(workdir: str, train_metric: str = "loss", eval_metric: str = "eval_loss") -> dict:
    """{"train": (steps, values), "eval": (steps, values), "tokens_per_step": n}."""
    records = read_metrics(workdir)
    out = {"tokens_per_step": tokens_per_step(workdir)}
    for part, metric in (("train", train_metric), ("eval", eval_metric)):
        points = [(r["step"], r[metric]) for r in records if isinstance(r.get(metric), (int, float))]
        out[part] = ([p[0] for p in points], [p[1] for p in points])
    return out


def labels_for(workdirs: Sequence[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def plot_runs(workdirs: Sequence[str], out: str, labels: Sequence[str] | None = None, train_metric: str = "loss",
              eval_metric: str = "eval_loss", title: str = "", size: tuple[float, float] = (10, 7),
              dpi: int = 80) -> dict:
    """Writes a 2 x 2 figure (rows: training, validation; columns: steps, tokens) to `out`.
    Returns {label: {"train": points, "eval": points}}."""
    if not workdirs:
        raise ConfigError("nothing to plot: give one or more run directories")
    labels = list(labels) if labels else labels_for(workdirs)
    if len(labels) != len(workdirs):
        raise ConfigError(f"{len(labels)} labels for {len(workdirs)} runs")
    data = [curves(w, train_metric, eval_metric) for w in workdirs]
    if not any(d["train"][0] or d["eval"][0] for d in data):
        raise ConfigError(f"no {train_metric} or {eval_metric} in the runs' metrics.jsonl")
    fig, axes = plt.subplots(2, 2, figsize=size, squeeze=False)
    summary = {}
    for label, d in zip(labels, data):
        summary[label] = {}
        for row, part in enumerate(("train", "eval")):
            steps, values = d[part]
            summary[label][part] = len(steps)
            if not steps:
                continue
            marker = "o" if len(steps) < 8 else None  # a few evaluations read better as points
            for col, x_axis in enumerate(X_AXES):
                xs = steps if x_axis == "step" else [s * d["tokens_per_step"] for s in steps]
                axes[row][col].plot(xs, values, label=label, marker=marker)
    for row, (part, metric) in enumerate((("training", train_metric), ("validation", eval_metric))):
        for col, x_axis in enumerate(X_AXES):
            ax = axes[row][col]
            ax.set_xlabel(x_axis if x_axis == "step" else "training tokens")
            ax.set_ylabel(f"{part} {metric}")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return summary
