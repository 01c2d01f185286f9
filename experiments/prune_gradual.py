"""prune_gradual: tiny_lm trained with gradual magnitude pruning to 80% sparsity (Zhu & Gupta's
cubic schedule): the masks are recomputed every 20 steps from step 30 to step 230, then held while
the remaining steps recover. Each layer's kernel is pruned to the target on its own.

    python experiments/prune_gradual.py [key=value ...]    # e.g. prune.kind=global

Result (shared 2-core CPU, defaults, 300 steps, same batches as tiny_lm): validation loss 1.845,
2.661 bits per byte (tiny_lm dense: 1.732, 2.498); logged sparsity 0.8000 of the 3,211,264 prunable
kernel params, 742,860 of 3,311,872 params nonzero. A dense model of that size
(experiments/prune_small_dense.py, 742,528 params) reaches 1.680, 2.424. 5 min 36 s wall.
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import comparison_config as tiny_config  # noqa: E402  (experiments build on each other)


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
