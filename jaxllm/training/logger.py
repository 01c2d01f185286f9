"""Run output: metrics.jsonl (one JSON object per log step), TensorBoard events, a progress bar.
Only process 0 writes; every process may call."""

from __future__ import annotations

import json
import os
import sys
from typing import Callable

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm

from jaxllm.config import Config
from jaxllm.training import metrics_file


class MetricsLogger:
    def __init__(self, cfg: Config, start_step: int = 0, extra_sink: Callable[[dict], None] | None = None):
        self.extra_sink = extra_sink
        self.is_writer = jax.process_index() == 0
        self.jsonl = self.tensorboard = self.bar = None
        if not self.is_writer:
            return
        path = metrics_file.metrics_path(cfg.workdir)
        # A resumed run writes the steps past its checkpoint again, after any line cut short.
        metrics_file.keep_through(path, start_step)
        self.jsonl = open(path, "a")
        self.tensorboard = SummaryWriter(os.path.join(cfg.workdir, "tensorboard"))
        if cfg.train.progress_bar:
            self.bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step", dynamic_ncols=True)

    def info(self, message: str) -> None:
        if self.is_writer:
            (self.bar.write if self.bar else print)(message, file=sys.stderr)

    def write(self, record: dict) -> None:
        if self.extra_sink is not None:
            self.extra_sink(record)
        if not self.is_writer:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, record["step"])
        if self.bar is not None:
            shown = {k: record[k] for k in ("loss", "eval_loss", "tokens_per_s") if k in record}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

    def progress(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)  # tqdm throttles the redraws

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()
        if self.bar:
            self.bar.close()
