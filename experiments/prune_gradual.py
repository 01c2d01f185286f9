"""prune_gradual: tiny_lm trained with gradual magnitude pruning to 80% sparsity (Zhu & Gupta's
cubic schedule): the masks are recomputed every 20 steps from step 30 to step 230, then held while
the remaining steps recover. Each layer's kernel is pruned to the target on its own.

    python experiments/prune_gradual.py [key=value ...]    # e.g. prune.kind=global

Result: see the README results table (compare with tiny_lm at the same 300 steps).
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import get_config as tiny_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    return dataclasses.replace(
        tiny_config(),
        workdir="runs/prune_gradual",
        prune=config.PruneConfig(
            kind="magnitude", sparsity=0.8, schedule="gradual", start_step=30, every=20, num_updates=10
        ),
    )


if __name__ == "__main__":
    main.run(get_config)
