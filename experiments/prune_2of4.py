"""prune_2of4: tiny_lm with 2:4 structured sparsity (two of every four consecutive weights along
each kernel's input dimension are zero), applied once after warm-up at step 60 and kept for the
rest of training.

    python experiments/prune_2of4.py [key=value ...]

Result (shared 2-core CPU, defaults, 300 steps, same batches as tiny_lm): validation loss 1.746,
2.519 bits per byte (tiny_lm dense: 1.732, 2.498); logged sparsity 0.5 in every prunable kernel,
1,706,240 of 3,311,872 params nonzero (the 742,528-param dense experiments/prune_small_dense.py:
1.680, 2.424). 5 min 52 s wall.
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import comparison_config as tiny_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    return dataclasses.replace(
        tiny_config(),
        workdir="runs/prune_2of4",
        prune=config.PruneConfig(kind="nm", n=2, m=4, schedule="one_shot", start_step=60),
    )


if __name__ == "__main__":
    main.run(get_config)
