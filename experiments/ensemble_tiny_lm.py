"""ensemble_tiny_lm: three tiny_lm runs that differ only in their init seed (same data order),
and their prediction ensemble. A shorter run than tiny_lm (120 steps) so that three fit in a few
minutes of a 2-core CPU; checkpoints every 30 steps so the last ones can also be averaged.

    python experiments/ensemble_tiny_lm.py seed=0 workdir=runs/ens_lm_0   # and seed=1, seed=2
    python -m jaxllm.ensemble --workdir runs/ens_lm_0 --workdir runs/ens_lm_1 --workdir runs/ens_lm_2 \
        --rule mean_prob --eval_batches 8
    python -m jaxllm.soup --workdir runs/ens_lm_0 --out runs/ens_lm_0_last3 --last 3

Result: see benchmarks/README.md ("Ensembles and soups"); filled in below once measured.
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import get_config as tiny_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = tiny_config()
    return dataclasses.replace(
        base,
        workdir="runs/ens_lm_0",
        train=dataclasses.replace(base.train, steps=120, log_every=20, eval_every=60, eval_batches=8),
        opt=dataclasses.replace(base.opt, learning_rate=3e-3, warmup_steps=20),
        checkpoint=config.CheckpointConfig(every=30, keep=4),
        sample_tokens=0,
    )


if __name__ == "__main__":
    main.run(get_config)
