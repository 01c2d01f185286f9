"""classify_stdlib_encoder: the pre-trained-encoder case on the embedded labelled task
(classify_stdlib.py's 8 standard-library packages): mlm_tiny's encoder, fully fine-tuned with a
mean-pooled score head. classify_stdlib_decoder.py starts from clm_tiny (the same network trained
causally) and classify_stdlib_encoder_scratch.py from random weights; all three use the same steps
and batches.

    python experiments/mlm_tiny.py && python experiments/clm_tiny.py
    python experiments/classify_stdlib_encoder.py
    python experiments/classify_stdlib_decoder.py
    python experiments/classify_stdlib_encoder_scratch.py
    python benchmarks/paired_accuracy.py --workdir runs/classify_stdlib_encoder --workdir runs/classify_stdlib_decoder

Result: see the README results table.
"""

import dataclasses

from jaxllm import config, main

from classify_stdlib import PACKAGES  # noqa: E402  (experiments build on each other)
from mlm_tiny import get_config as mlm_config  # noqa: E402


def get_config() -> config.Config:
    base = mlm_config()
    return dataclasses.replace(
        base,
        workdir="runs/classify_stdlib_encoder",
        family="classifier",
        init_from="runs/mlm_tiny",
        data=dataclasses.replace(base.data, dataset="stdlib_packages", classes=PACKAGES),
        classifier=config.ClassifierConfig(num_classes=len(PACKAGES), backbone="encoder", pooling="mean"),
        finetune=config.FinetuneConfig(mode="full"),
        train=dataclasses.replace(base.train, steps=300, batch_size=16, seq_len=128, log_every=25,
                                  eval_every=150, eval_batches=36),  # 36 x 16 covers the 569 snippets
        opt=dataclasses.replace(base.opt, learning_rate=1e-3, warmup_steps=30),
        checkpoint=config.CheckpointConfig(every=150, keep=1),
    )


if __name__ == "__main__":
    main.run(get_config)
