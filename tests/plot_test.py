"""Run comparison plots (jaxllm/plots.py, cli/plot.py)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from jaxllm import config as C
from jaxllm import plots
from jaxllm.cli import plot as plot_cli


def _run(root, name, losses, eval_every=2, batch_size=4, seq_len=8):
    workdir = os.path.join(root, name)
    os.makedirs(workdir)
    cfg = C.Config(workdir=workdir, train=C.TrainConfig(batch_size=batch_size, seq_len=seq_len))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(C.to_json(cfg))
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step, loss in enumerate(losses, start=1):
            record = {"step": step, "loss": loss}
            if step % eval_every == 0:
                record["eval_loss"] = loss + 0.1
            f.write(json.dumps(record) + "\n")
    return workdir


def test_plot_has_one_line_per_run_and_changes_with_the_data(tmp_path):
    a = _run(str(tmp_path), "a", [3.0, 2.5, 2.2, 2.0, 1.9, 1.8])
    b = _run(str(tmp_path), "b", [3.1, 2.9, 2.4, 2.3, 2.1, 2.0], batch_size=8)
    out = str(tmp_path / "ab.png")
    summary = plots.plot_runs([a, b], out, dpi=50)
    assert summary == {"a": {"train": 6, "eval": 3}, "b": {"train": 6, "eval": 3}}
    with Image.open(out) as image:
        assert image.size == (500, 350)  # 10 x 7 inches at 50 dpi
        first = np.asarray(image.convert("RGB"))
    # Two runs draw two colours of lines; other data draws a different image.
    c = _run(str(tmp_path), "c", [3.0, 1.0, 0.5, 0.4, 0.3, 0.2])
    plots.plot_runs([a, c], out, dpi=50)
    with Image.open(out) as image:
        second = np.asarray(image.convert("RGB"))
    assert first.shape == second.shape and np.mean(first != second) > 0.001
    # Three runs: three lines in every panel.
    assert plots.plot_runs([a, b, c], out, dpi=50).keys() == {"a", "b", "c"}
    colours = {tuple(p) for p in np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)}
    for tab in ((31, 119, 180), (255, 127, 14), (44, 160, 44)):  # matplotlib's first three line colours
        assert tab in colours


def test_tokens_axis_and_errors(tmp_path, capsys):
    a = _run(str(tmp_path), "a", [3.0, 2.5])
    assert plots.curves(a)["tokens_per_step"] == 32
    with pytest.raises(SystemExit):
        plot_cli.main([str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    assert "metrics.jsonl not found" in capsys.readouterr().err
    plot_cli.main([a, "--out", str(tmp_path / "y.png"), "--label", "run a"])
    assert json.loads(capsys.readouterr().out)["points"] == {"run a": {"train": 2, "eval": 1}}
