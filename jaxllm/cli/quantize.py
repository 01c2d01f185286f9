"""int8- or int4-quantize a run's latest params into a new run directory (see
compression/quantize.py).

    python -m jaxllm.quantize --workdir runs/tiny_lm --out runs/tiny_lm_int8 [--eval_batches 4]
    python -m jaxllm.quantize --workdir runs/tiny_lm --out runs/tiny_lm_int4 --bits 4 [--group_size 128]
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
from jaxllm.compression.quantize import (DEFAULT_GROUP_SIZE, FORMAT, FORMAT_INT4, META_KEY, QUANTIZED_KERNELS,
                                         QuantizationError, kernel_bytes, quantize_params, to_checkpoint,
                                         weight_bytes)
from jaxllm.config import ConfigError
from jaxllm.training import checkpoint as ckpt
from jaxllm.training import train, workdir_lock


def checkpoint_quantization(workdir: str) -> dict | None:
    """The quantization record of the latest checkpoint in `workdir` (None for a float one)."""
    return restore.checkpoint_meta(workdir).get(META_KEY)


@workdir_lock.holding("out")
def quantize_workdir(workdir: str, out: str, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE) -> dict:
    """Writes the int8 (or int4, one scale per `group_size` input channels) version of
    `workdir`'s latest params to a new run directory `out` (config.json plus a params-only
    checkpoint at the same step). Returns its meta."""
    if os.path.abspath(out) == os.path.abspath(workdir):
        raise QuantizationError("--out must differ from --workdir (the float checkpoint is kept)")
    if ckpt.holds_checkpoints(out):
        raise QuantizationError(f"{out} already holds checkpoints; choose an empty --out")
    config_lib.read_config_json(workdir)  # a clear error if workdir is not a run directory
    if checkpoint_quantization(workdir) is not None:
        raise QuantizationError(f"{workdir} already holds a quantized checkpoint")
    cfg, params, step = restore.load_params(workdir, return_step=True)
    quantized = quantize_params(params, bits=bits, group_size=group_size)
    record = {"format": FORMAT, "source": os.path.abspath(workdir),
              "rules": [[p, list(a)] for p, a in QUANTIZED_KERNELS]}
    if bits == 4:
        record.update(format=FORMAT_INT4, bits=4, group_size=group_size)
        quantized = to_checkpoint(quantized)
    meta = {"data_step": step, "config": config_lib.to_dict(cfg), META_KEY: record}
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
    parser = argparse.ArgumentParser(description="int8- or int4-quantize a jaxllm checkpoint.")
    parser.add_argument("--workdir", required=True, help="run directory with a float checkpoint")
    parser.add_argument("--out", required=True, help="new run directory for the quantized checkpoint")
    parser.add_argument("--bits", type=int, default=8, choices=(8, 4),
                        help="8: one scale per output channel; 4: one per --group_size input channels")
    parser.add_argument("--group_size", type=int, default=DEFAULT_GROUP_SIZE,
                        help="int4: input channels sharing a scale (must divide each kernel's input size)")
    parser.add_argument("--eval_batches", type=int, default=0,
                        help="also report validation loss, float vs quantized, over this many batches")
    args = parser.parse_args(argv)
    if args.eval_batches < 0:
        parser.error(f"--eval_batches {args.eval_batches} must be 0 (no evaluation) or more")
    if args.group_size < 1:
        parser.error(f"--group_size {args.group_size} must be 1 or more")
    kind = f"int{args.bits}"
    try:
        quantize_workdir(args.workdir, args.out, args.bits, args.group_size)
        _, float_params = restore.load_params(args.workdir)
        _, quantized_params = restore.load_params(args.out)
        report = {"out": os.path.abspath(args.out),
                  "weight_bytes_float": weight_bytes(float_params),
                  f"weight_bytes_{kind}": weight_bytes(quantized_params),
                  "kernel_bytes_float": kernel_bytes(float_params),
                  f"kernel_bytes_{kind}": kernel_bytes(quantized_params)}
        if args.eval_batches:
            report["eval_loss_float"] = evaluate_workdir(args.workdir, args.eval_batches)["eval_loss"]
            report[f"eval_loss_{kind}"] = evaluate_workdir(args.out, args.eval_batches)["eval_loss"]
    except (FileNotFoundError, QuantizationError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
