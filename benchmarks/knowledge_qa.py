"""Did a kg_facts run learn the fused facts, beyond what fusing teaches about answers in general?
Compares two `python -m jaxllm.qa --examples N --out F` results on the same questions: per
question, the augmented run's answer bits per byte minus the baseline's, averaged over the fused
and the held-out part; the difference of the two (negative: the fused facts were learned) with a
bootstrap 95 % interval. One JSON object.

    python -m jaxllm.qa --workdir runs/knowledge_tiny_lm --examples 300 --out aug.json
    python -m jaxllm.qa --workdir runs/knowledge_baseline --examples 300 --out base.json
    python benchmarks/knowledge_qa.py aug.json base.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("augmented")
    parser.add_argument("baseline")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    with open(args.augmented) as f:
        aug = json.load(f)["examples"]
    with open(args.baseline) as f:
        base = json.load(f)["examples"]
    if [e["prompt"] for e in aug] != [e["prompt"] for e in base]:
        raise SystemExit("error: the two results hold different questions; evaluate both with the same --examples")
    rng = np.random.default_rng(0)
    out = {"questions": {p: sum(e["part"] == p for e in aug) for p in ("fused", "held_out")}}
    for style in ("question", "fused_phrasing"):
        key = f"{style}_bits_per_byte"
        diff = {p: np.array([a[key] - b[key] for a, b in zip(aug, base) if a["part"] == p])
                for p in ("fused", "held_out")}
        boots = [rng.choice(diff["fused"], len(diff["fused"])).mean()
                 - rng.choice(diff["held_out"], len(diff["held_out"])).mean() for _ in range(args.resamples)]
        out[style] = {"augmented_minus_baseline": {p: round(float(d.mean()), 4) for p, d in diff.items()},
                      "fused_minus_held_out": round(float(diff["fused"].mean() - diff["held_out"].mean()), 4),
                      "ci95": [round(float(x), 4) for x in np.percentile(boots, [2.5, 97.5])]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
