"""vlm_digits_blind: vlm_digits with every image replaced by zeros, the same steps and batches:
what the decoder answers from the question alone (chance for the digit's name, the majority answer
for yes/no). The baseline of the README's vision-language row.

    python experiments/vlm_digits_blind.py
"""

import dataclasses

from jaxllm import config, main

from vlm_digits import get_config as vlm_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = vlm_config()
    return dataclasses.replace(base, workdir="runs/vlm_digits_blind",
                               data=dataclasses.replace(base.data, blank_images=True))


if __name__ == "__main__":
    main.run(get_config)
