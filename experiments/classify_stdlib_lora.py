"""classify_stdlib_lora: classify_stdlib with LoRA (rank 8 on attention q, k, v, o) plus the score head; the backbone frozen.

    python experiments/classify_stdlib_lora.py [key=value ...]

Result (same steps and batches as classify_stdlib): accuracy 0.485, macro-F1 0.153 with 67.6k
trainable params (2.0 % of 3.31M); full fine-tuning 0.490 / 0.185. With finetune.lora.dropout=0.1
(dropout on the adapters' input): 0.497 / 0.185.
"""

import dataclasses

from jaxllm import config, main

from classify_stdlib import get_config as full_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = full_config()
    return dataclasses.replace(
        base,
        workdir="runs/classify_stdlib_lora",
        finetune=config.FinetuneConfig(mode="lora", lora=config.LoraConfig(rank=8, alpha=16.0)),
        opt=dataclasses.replace(base.opt, learning_rate=3e-3),
    )


if __name__ == "__main__":
    main.run(get_config)
