"""moe_tiny: tiny_lm with a mixture-of-experts MLP in every block: 8 SwiGLU experts of width 352,
top-2 routing (softmax then top-k, renormalised), dropless dispatch. Two experts of half tiny_lm's
MLP width per token make the active parameters and FLOPs per token equal tiny_lm's, with 4x the
MLP parameters in all. Trains on a 2-core CPU in minutes.

    python experiments/moe_tiny.py [key=value ...]    # e.g. model.moe.dispatch=capacity

Result (2-core CPU, 300 steps, `python benchmarks/moe_vs_dense.py`, which trains this and tiny_lm on
the same batches): validation 1.755 / 2.533 bits per byte against dense tiny_lm's 1.732 / 2.498; see
the README results table.
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import comparison_config as tiny_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = tiny_config()
    return dataclasses.replace(
        base,
        workdir="runs/moe_tiny",
        model=dataclasses.replace(
            base.model,
            moe=config.MoeConfig(num_experts=8, top_k=2, expert_dim=base.model.mlp_dim // 2,
                                 dispatch="dropless"),
        ),
    )


if __name__ == "__main__":
    main.run(get_config)
