"""clm_tiny: mlm_tiny's network (same width, depth, LayerNorm, learned positions, GELU MLP) trained
causally, on next-byte prediction, with the same steps and batch shapes: the decoder side of the
classification comparison (classify_stdlib_encoder.py).

    python experiments/clm_tiny.py [key=value ...]

Result: see the README results table.
"""

import dataclasses

from jaxllm import config, main

from mlm_tiny import get_config as mlm_config, model_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    return dataclasses.replace(mlm_config(), workdir="runs/clm_tiny", family="causal_lm",
                               model=model_config("causal"))


if __name__ == "__main__":
    main.run(get_config)
