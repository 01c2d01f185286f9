"""Is classifier A really more accurate than classifier B? Both are evaluated on the same
validation examples; prints JSON with each one's accuracy, the difference, a paired bootstrap 95%
interval of the difference, and McNemar's exact test on the examples where exactly one is right.

    python benchmarks/paired_accuracy.py --workdir runs/classify_stdlib --workdir runs/classify_stdlib_scratch

Small differences on a few hundred examples are often noise: this is the check before calling one
fine-tuning mode better than another.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import sharding
from jaxllm.combine import ensemble


def correct_per_example(ens: ensemble.Ensemble) -> np.ndarray:
    """bool [members, examples]: each member's argmax equals the label, over every validation row."""
    batches = ensemble.eval_batches(ens)

    @jax.jit
    def predictions(params, batch):
        return jnp.stack([jnp.argmax(lp, -1) for lp in ensemble.member_log_probs(ens.models, params, batch)])

    rows = []
    for k in range(batches.num_batches):
        batch = sharding.place_batch(batches.global_batch(k), ens.mesh)
        with sharding.activate(ens.mesh):
            predicted_MB = np.asarray(jax.device_get(predictions(ens.params, batch)))
        host = batches.global_batch(k)
        keep = host["weights"] > 0
        rows.append(predicted_MB[:, keep] == host["labels"][keep][None, :])
    return np.concatenate(rows, axis=1)


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact binomial test of only_a vs only_b discordant pairs (p = 1/2 under H0)."""
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2 * tail)


def compare(correct_a: np.ndarray, correct_b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> dict:
    n = len(correct_a)
    difference = correct_a.astype(np.float64) - correct_b
    rng = np.random.default_rng(seed)
    draws = difference[rng.integers(0, n, (resamples, n))].mean(axis=1)
    only_a, only_b = int(np.sum(correct_a & ~correct_b)), int(np.sum(~correct_a & correct_b))
    return {"examples": n, "accuracy_a": float(correct_a.mean()), "accuracy_b": float(correct_b.mean()),
            "difference": float(difference.mean()),
            "bootstrap_95": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))],
            "only_a_right": only_a, "only_b_right": only_b, "mcnemar_p": mcnemar_exact_p(only_a, only_b)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", action="append", required=True, help="exactly two classifier runs: A, then B")
    args = parser.parse_args(argv)
    if len(args.workdir) != 2:
        parser.error("give exactly two --workdir (A and B)")
    ens = ensemble.load(args.workdir)
    if ens.family != "classifier":
        parser.error(f"{args.workdir[0]} is a {ens.family} run; this compares classifiers")
    correct = correct_per_example(ens)
    print(json.dumps({"a": args.workdir[0], "b": args.workdir[1], **compare(correct[0], correct[1])}, indent=1))


if __name__ == "__main__":
    main()
