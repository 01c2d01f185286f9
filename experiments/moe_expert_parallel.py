"""moe_expert_parallel: moe_tiny trained expert-parallel: the 8 experts are split over 4 devices
(2 each) and the batch over all 8 (data=2 x expert=4). Every MoE layer exchanges token copies with
all_to_all over `expert`; everything else is data parallel. On one CPU, fake the 8 devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/moe_expert_parallel.py

On 8 GPUs or a TPU slice with 8 chips, drop XLA_FLAGS. The losses equal moe_tiny's on one device
(tests/moe_test.py checks one step of each to rtol 1e-5); see the README for the measured run.
"""

import dataclasses

from jaxllm import config, main

from moe_tiny import get_config as moe_tiny_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    return dataclasses.replace(
        moe_tiny_config(),
        workdir="runs/moe_expert_parallel",
        mesh=config.MeshConfig(data=2, fsdp=1, tensor=1, expert=4),
    )


if __name__ == "__main__":
    main.run(get_config)
