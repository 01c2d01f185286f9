"""Is classifier A really more accurate than classifier B? Both are evaluated on the same
validation examples; prints JSON with each one's accuracy, the difference, a paired bootstrap 95%
interval of the difference, and McNemar's exact test on the examples where exactly one is right;
the same for macro-F1 (its difference and a paired bootstrap interval over the same examples).

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


def predictions_per_example(ens: ensemble.Ensemble) -> tuple[np.ndarray, np.ndarray]:
    """(each member's argmax [members, examples], the labels [examples]), over every validation row."""
    batches = ensemble.eval_batches(ens)

    @jax.jit
    def predictions(params, batch):
        return jnp.stack([jnp.argmax(lp, -1) for lp in ensemble.member_log_probs(ens.models, params, batch)])

    rows, labels = [], []
    for k in range(batches.num_batches):
        batch = sharding.place_batch(batches.global_batch(k), ens.mesh)
        with sharding.activate(ens.mesh):
            predicted_MB = np.asarray(jax.device_get(predictions(ens.params, batch)))
        host = batches.global_batch(k)
        keep = host["weights"] > 0
        rows.append(predicted_MB[:, keep])
        labels.append(host["labels"][keep])
    return np.concatenate(rows, axis=1), np.concatenate(labels)


def correct_per_example(ens: ensemble.Ensemble) -> np.ndarray:
    """bool [members, examples]: each member's argmax equals the label, over every validation row."""
    predicted, labels = predictions_per_example(ens)
    return predicted == labels[None, :]


def macro_f1(predicted: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Macro-F1 over the classes present in `labels` (as the classifier's evaluation computes it),
    for each row of example weights [R, N] (a bootstrap resample's counts; ones: the data as is)."""
    classes = np.arange(max(predicted.max(), labels.max()) + 1)
    true_NC = (labels[:, None] == classes).astype(np.float64)
    predicted_NC = (predicted[:, None] == classes).astype(np.float64)
    hits_RC = weights @ (true_NC * predicted_NC)
    true_RC, predicted_RC = weights @ true_NC, weights @ predicted_NC
    f1_RC = np.where(true_RC + predicted_RC > 0, 2 * hits_RC / np.maximum(true_RC + predicted_RC, 1e-12), 0.0)
    present_RC = true_RC > 0
    return (f1_RC * present_RC).sum(1) / np.maximum(present_RC.sum(1), 1)


def compare_macro_f1(predicted_a, predicted_b, labels, resamples: int = 10_000, seed: int = 0) -> dict:
    n = len(labels)
    draws = np.random.default_rng(seed).integers(0, n, (resamples, n))
    counts = np.zeros((resamples, n))
    np.add.at(counts, (np.arange(resamples)[:, None], draws), 1.0)
    ones = np.ones((1, n))
    f1_a, f1_b = macro_f1(predicted_a, labels, ones)[0], macro_f1(predicted_b, labels, ones)[0]
    differences = macro_f1(predicted_a, labels, counts) - macro_f1(predicted_b, labels, counts)
    return {"macro_f1_a": float(f1_a), "macro_f1_b": float(f1_b), "macro_f1_difference": float(f1_a - f1_b),
            "macro_f1_bootstrap_95": [float(np.percentile(differences, 2.5)), float(np.percentile(differences, 97.5))]}


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
    predicted, labels = predictions_per_example(ens)
    correct = predicted == labels[None, :]
    print(json.dumps({"a": args.workdir[0], "b": args.workdir[1], **compare(correct[0], correct[1]),
                      **compare_macro_f1(predicted[0], predicted[1], labels)}, indent=1))


if __name__ == "__main__":
    main()
