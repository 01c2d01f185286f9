"""classify_stdlib_decoder: classify_stdlib_encoder with clm_tiny's causally pre-trained network
(same size and recipe) as the backbone: causal attention, the same mean-pooled head, steps and
batches.

    python experiments/clm_tiny.py && python experiments/classify_stdlib_decoder.py

Result: see the README results table.
"""

import dataclasses

from jaxllm import main

from classify_stdlib_encoder import get_config as encoder_config  # noqa: E402  (experiments build on each other)


def get_config():
    base = encoder_config()
    return dataclasses.replace(
        base, workdir="runs/classify_stdlib_decoder", init_from="runs/clm_tiny",
        model=dataclasses.replace(base.model, attention_kind="causal"),
        classifier=dataclasses.replace(base.classifier, backbone="decoder"))


if __name__ == "__main__":
    main.run(get_config)
