"""int8-quantize a run's latest params into a new run directory (see compression/quantize.py).

    python -m jaxllm.quantize --workdir runs/tiny_lm --out runs/tiny_lm_int8 [--eval_batches 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Sequence

import jax

from jaxllm import config as config_lib
from jaxllm import restore
from jaxllm.compression.quantize import (FORMAT, META_KEY, QUANTIZED_KERNELS, QuantizationError, kernel_bytes,
                                         quantize_params, weight_bytes)
from jaxllm.config import ConfigError
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import train, workdir_lock


def checkpoint_quantization(workdir: str) -> dict | None:
    """The quantization record of the latest checkpoint in `workdir` (None for a float one)."""
    return restore.checkpoint_meta(workdir).get(META_KEY)


@workdir_lock.holding("out")
def quantize_workdir(workdir: str, out: str) -> dict:
    """Writes the int8 version of `workdir`'s latest params to a new run directory `out`
    (config.json plus a params-only checkpoint at the same step). Returns its meta."""
    if os.path.abspath(out) == os.path.abspath(workdir):
        raise QuantizationError("--out must differ from --workdir (the float checkpoint is kept)")
    if ckpt.holds_checkpoints(out):
        raise QuantizationError(f"{out} already holds checkpoints; choose an empty --out")
    config_lib.read_config_json(workdir)  # a clear error if workdir is not a run directory
    if checkpoint_quantization(workdir) is not None:
        raise QuantizationError(f"{workdir} already holds an int8-quantized checkpoint")
    cfg, params, step = restore.load_params(workdir, return_step=True)
    quantized = quantize_params(params)
    meta = {
        "data_step": step,
        "config": config_lib.to_dict(cfg),
        META_KEY: {"format": FORMAT, "source": os.path.abspath(workdir),
                   "rules": [[p, list(a)] for p, a in QUANTIZED_KERNELS]},
    }
    os.makedirs(out, exist_ok=True)
    shutil.copyfile(os.path.join(workdir, "config.json"), os.path.join(out, "config.json"))
    checkpointer = ckpt.Checkpointer(ckpt.checkpoint_dir(out))
    try:
        checkpointer.save(step, {"params": quantized}, meta)
    finally:
        checkpointer.close()
    return meta


def evaluate_workdir(workdir: str, num_batches: int) -> dict:
    """Validation loss of `workdir`'s latest params (float or quantized) on its config's data."""
    cfg, params = restore.load_params(workdir)
    s = train.setup(cfg, jax.tree.leaves(params)[0].sharding.mesh)
    eval_step = train.make_eval_step(s, param_shardings=jax.tree.map(lambda x: x.sharding, params))
    return train.evaluate(s, eval_step, params, s.family.batches(cfg, "eval"), num_batches)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="int8-quantize a jaxllm checkpoint.")
    parser.add_argument("--workdir", required=True, help="run directory with a float checkpoint")
    parser.add_argument("--out", required=True, help="new run directory for the int8 checkpoint")
    parser.add_argument("--eval_batches", type=int, default=0,
                        help="also report validation loss, float vs int8, over this many batches")
    args = parser.parse_args(argv)
    if args.eval_batches < 0:
        parser.error(f"--eval_batches {args.eval_batches} must be 0 (no evaluation) or more")
    try:
        quantize_workdir(args.workdir, args.out)
        _, float_params = restore.load_params(args.workdir)
        _, int8_params = restore.load_params(args.out)
        report = {"out": os.path.abspath(args.out),
                  "weight_bytes_float": weight_bytes(float_params),
                  "weight_bytes_int8": weight_bytes(int8_params),
                  "kernel_bytes_float": kernel_bytes(float_params),
                  "kernel_bytes_int8": kernel_bytes(int8_params)}
        if args.eval_batches:
            report["eval_loss_float"] = evaluate_workdir(args.workdir, args.eval_batches)["eval_loss"]
            report["eval_loss_int8"] = evaluate_workdir(args.out, args.eval_batches)["eval_loss"]
    except (FileNotFoundError, QuantizationError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
