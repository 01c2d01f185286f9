"""Entry point of every experiment file: `python experiments/NAME.py key=value ...`.

Parses dotted overrides onto the experiment's config, initialises multi-host JAX when asked, trains
(resuming from <workdir>/checkpoints if a checkpoint exists), and writes a generated sample.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Callable, Iterator, Sequence

# Before jax or tensorflow_datasets start: their C++ logging is noise for an experiment's user.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

from jaxllm import decoding, distributed  # noqa: E402
from jaxllm.compression import distill  # noqa: E402
from jaxllm.config import Config, ConfigError, override, valid_keys  # noqa: E402
from jaxllm.models import MODELS  # noqa: E402
from jaxllm.training import train, workdir_lock  # noqa: E402


def parse(get_config: Callable[[], Config], argv: Sequence[str]) -> Config:
    return override(get_config(), argv)


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _train_and_sample(cfg: Config) -> None:
    if cfg.distill.enabled:
        distill.train(cfg)
    else:
        train.train(cfg)
    if not MODELS.get(cfg.family).generates:
        pass  # a classifier's run ends with its evaluation
    elif cfg.sample_tokens > 0 and cfg.checkpoint.every <= 0:
        # The sample is drawn from the saved checkpoint, exactly as `python -m jaxllm.generate`
        # would; with saving off there is none.
        print("no sample: checkpoint.every=0 wrote no checkpoint to sample from", file=sys.stderr)
    elif cfg.sample_tokens > 0 and jax.process_count() > 1:
        # Sampling loads the params onto one process's devices; run it as its own job.
        if jax.process_index() == 0:
            print(f"no sample in a multi-process run: sample with `python -m jaxllm.generate "
                  f"--workdir {cfg.workdir}` on one host", file=sys.stderr)
    elif cfg.sample_tokens > 0:
        text = decoding.sample_from_workdir(cfg.workdir, cfg.sample_prompt, cfg.sample_tokens)
        if jax.process_index() == 0:
            with open(os.path.join(cfg.workdir, "sample.txt"), "w") as f:
                f.write(text)
            print(f"--- sample ---\n{text}\n--------------", file=sys.stderr)


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM (a preempted or cancelled job) exits through the `finally` blocks, as an error
    would: the pending checkpoint save completes and the workdir lock is released, so a relaunch
    on another host need not wait for the lock to go stale."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(get_config: Callable[[], Config], argv: Sequence[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print("usage: python EXPERIMENT.py [key=value ...]\nkeys:\n  " + "\n  ".join(valid_keys(get_config())))
        return
    try:
        cfg = parse(get_config, argv)
    except ConfigError as e:
        _fail(str(e))

    try:
        # Before anything else touches JAX: the device list is fixed when a backend starts.
        distributed.maybe_initialize(cfg)
    except ConfigError as e:
        _fail(str(e))

    try:
        # The lock covers the sample too: it is written into the workdir after training.
        with _sigterm_unwinds(), workdir_lock.hold(cfg.workdir):
            _train_and_sample(cfg)
    except (ConfigError, train.TrainingError, FileNotFoundError) as e:
        _fail(str(e))
