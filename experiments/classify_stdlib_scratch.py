"""classify_stdlib_scratch: classify_stdlib with the same classifier trained from random initialisation (no pre-training).

    python experiments/classify_stdlib_scratch.py [key=value ...]

Result (same steps and batches as classify_stdlib): accuracy 0.468, macro-F1 0.170; pre-trained
and fully fine-tuned 0.490 / 0.185.
"""

import dataclasses

from jaxllm import config, main

from classify_stdlib import get_config as full_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = full_config()
    return dataclasses.replace(
        base,
        workdir="runs/classify_stdlib_scratch",
        init_from="",
    )


if __name__ == "__main__":
    main.run(get_config)
