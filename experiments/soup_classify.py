"""soup_classify: classify_stdlib fine-tuned several times from one pre-trained tiny_lm (different
data orders and learning rates, the same score-head init), then their uniform soup, greedy soup
and prediction ensemble. Shorter rows and fewer steps than classify_stdlib so that the ingredients
fit in a few minutes each on a 2-core CPU.

    python experiments/tiny_lm.py
    python experiments/soup_classify.py workdir=runs/soup_a                                   # and:
    python experiments/soup_classify.py workdir=runs/soup_b data.seed=1
    python experiments/soup_classify.py workdir=runs/soup_c data.seed=2 opt.learning_rate=5e-4
    python experiments/soup_classify.py workdir=runs/soup_d data.seed=3 opt.learning_rate=2e-3
    python -m jaxllm.soup --workdir runs/soup_a ... --workdir runs/soup_d --out runs/soup_greedy --greedy
    python -m jaxllm.ensemble --workdir runs/soup_a ... --workdir runs/soup_d --rule mean_prob

Result: see benchmarks/README.md ("Ensembles and soups"); filled in below once measured.
"""

import dataclasses

from jaxllm import config, main

from classify_stdlib import get_config as classify_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = classify_config()
    return dataclasses.replace(
        base,
        workdir="runs/soup_a",
        train=dataclasses.replace(base.train, steps=100, batch_size=16, seq_len=128, log_every=25,
                                  eval_every=100, eval_batches=36),
        opt=dataclasses.replace(base.opt, learning_rate=1e-3, warmup_steps=20),
        checkpoint=config.CheckpointConfig(every=100, keep=1),
    )


if __name__ == "__main__":
    main.run(get_config)
