"""classify_stdlib_encoder_scratch: classify_stdlib_encoder's classifier from random weights (no
pre-training), same steps and batches.

    python experiments/classify_stdlib_encoder_scratch.py

Result: see the README results table.
"""

import dataclasses

from jaxllm import main

from classify_stdlib_encoder import get_config as encoder_config  # noqa: E402  (experiments build on each other)


def get_config():
    return dataclasses.replace(encoder_config(), workdir="runs/classify_stdlib_encoder_scratch", init_from="")


if __name__ == "__main__":
    main.run(get_config)
