"""prune_small_dense: the dense baseline for the pruning experiments. A tiny_lm-shaped model (same
depth, data, optimizer and 300 steps) made narrow enough that its parameter count matches the
nonzero parameters of tiny_lm pruned to 80% (experiments/prune_gradual.py): d_model 128, 2 heads
(head_dim 64, as in tiny_lm), mlp_dim 280.

tiny_lm: 3,211,264 prunable kernel params (attention q/k/v/o and MLP gate/up/down) + 100,608 others
(embedding 98,304, norms 2,304) = 3,311,872; at 80% sparsity per tensor 642,252 kernel params stay,
742,860 nonzero in all. This model: 742,528 params, all dense.

    python experiments/prune_small_dense.py [key=value ...]

Result (shared 2-core CPU, defaults, 300 steps, same batches as tiny_lm): validation loss 1.680,
2.424 bits per byte; tiny_lm dense (3,311,872 params) 1.732, 2.498; tiny_lm gradually pruned to 80%
(prune_gradual.py, 742,860 nonzero) 1.845, 2.661; 2:4 (prune_2of4.py, 1,706,240 nonzero) 1.746,
2.519. At 300 steps the small dense model is the best of the four. 2 min 18 s wall.
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import comparison_config as tiny_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = tiny_config()
    return dataclasses.replace(
        base,
        workdir="runs/prune_small_dense",
        model=dataclasses.replace(
            base.model, d_model=128, num_heads=2, num_kv_heads=2, mlp_dim=280
        ),
    )


if __name__ == "__main__":
    main.run(get_config)
