"""A masked-LM run's masked-token accuracy and loss against the unigram baseline: predicting every
chosen token from the training split's token frequencies alone (no context). Both are measured on
the run's own validation masking (the same eval batches training evaluates). Prints JSON.

    python benchmarks/mlm_baseline.py --workdir runs/mlm_tiny
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import numpy as np

from jaxllm import masking, restore, sharding
from jaxllm.models import MODELS


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--eval_batches", type=int, default=0, help="0: the run's train.eval_batches")
    args = parser.parse_args(argv)
    cfg, params, step = restore.load_params(args.workdir, return_step=True)
    if cfg.family != "masked_lm":
        parser.error(f"{args.workdir} is a {cfg.family} run, not masked_lm")
    train_tokens = np.asarray(masking.train_batches(cfg).tokens)
    counts = np.bincount(train_tokens, minlength=cfg.model.vocab_size).astype(np.float64)
    counts[masking.special_ids(masking.tokenizer_lib.load(cfg.model.tokenizer))] = 0  # never chosen
    log_p = np.log(np.maximum(counts, 1e-12) / counts.sum())
    batches = masking.eval_batches(cfg)
    model, mesh = MODELS.get("masked_lm").build(cfg), sharding.make_mesh(cfg.mesh)
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b["inputs"], b["segment_ids"], b["positions"]))
    sums = dict(chosen=0.0, unigram_correct=0.0, unigram_nll=0.0, model_correct=0.0, model_nll=0.0)
    for k in range(args.eval_batches or cfg.train.eval_batches):
        batch = batches.global_batch(k)
        w, targets = batch["weights"], batch["targets"]
        with sharding.activate(mesh):
            logits = np.asarray(jax.device_get(apply(params, sharding.place_batch(batch, mesh))), np.float64)
        model_log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        sums["chosen"] += w.sum()
        sums["unigram_correct"] += (w * (targets == np.argmax(log_p))).sum()
        sums["unigram_nll"] -= (w * log_p[targets]).sum()
        sums["model_correct"] += (w * (np.argmax(logits, -1) == targets)).sum()
        sums["model_nll"] -= (w * np.take_along_axis(model_log_p, targets[..., None], -1)[..., 0]).sum()
    sums = {k: float(v) for k, v in sums.items()}
    n = sums["chosen"]
    print(json.dumps({
        "workdir": args.workdir, "step": step, "chosen_tokens": int(n),
        "masked_token_accuracy": sums["model_correct"] / n, "masked_token_loss": sums["model_nll"] / n,
        "unigram_accuracy": sums["unigram_correct"] / n, "unigram_loss": sums["unigram_nll"] / n,
        "loss_bits_per_token": sums["model_nll"] / n / math.log(2),
        "unigram_bits_per_token": sums["unigram_nll"] / n / math.log(2)}, indent=1))


if __name__ == "__main__":
    main()
