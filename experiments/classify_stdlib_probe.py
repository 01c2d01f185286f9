"""classify_stdlib_probe: classify_stdlib with a linear probe: the pre-trained backbone frozen, only the score head trains.

    python experiments/classify_stdlib_probe.py [key=value ...]

Result (same steps and batches as classify_stdlib): accuracy 0.443, macro-F1 0.158 with 2,048
trainable params; full fine-tuning 0.490 / 0.185.
"""

import dataclasses

from jaxllm import config, main

from classify_stdlib import get_config as full_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = full_config()
    return dataclasses.replace(
        base,
        workdir="runs/classify_stdlib_probe",
        finetune=config.FinetuneConfig(mode="probe"),
        opt=dataclasses.replace(base.opt, learning_rate=3e-3),
    )


if __name__ == "__main__":
    main.run(get_config)
