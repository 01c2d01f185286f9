"""moe_expert_choice: moe_tiny with expert-choice routing (Zhou et al. 2022): in every row each
expert takes the C = top_k · L / E · capacity_factor tokens it scores highest, so every expert does
the same work and no balance loss is needed.

    python experiments/moe_expert_choice.py [key=value ...]    # e.g. model.moe.capacity_factor=2

Result (AMD EPYC 2-core, moe_tiny's 300 steps and batches): validation loss / bits per byte 2.249 /
3.244 (step 100), 1.864 / 2.689 (200), 1.682 / 2.427 (300), against token-choice dropless moe_tiny's
2.246 / 3.240, 1.952 / 2.816, 1.772 / 2.557 in the same session. At step 300 0.1-1.9 % of the
tokens (by layer) were taken by no expert.
"""

import dataclasses

from jaxllm import config, main

from moe_tiny import get_config as moe_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = moe_config()
    return dataclasses.replace(
        base,
        workdir="runs/moe_expert_choice",
        model=dataclasses.replace(
            base.model,
            moe=dataclasses.replace(base.model.moe, dispatch="expert_choice", capacity_factor=1.0,
                                    aux_loss_weight=0.0),
        ),
    )


if __name__ == "__main__":
    main.run(get_config)
