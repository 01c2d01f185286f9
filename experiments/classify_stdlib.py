"""classify_stdlib: the embedded transfer-learning task. Snippets (~600 bytes) of the standard
library are classified by the top-level package they come from, 8 classes; the classifier's
validation snippets come only from files the language model never trained on (the corpus's
validation files). This file fine-tunes all of a pre-trained tiny_lm with a new score head;
classify_stdlib_{probe,lora,scratch}.py change only what trains, on the same steps and batches.

    python experiments/tiny_lm.py
    python experiments/classify_stdlib.py [init_from=runs/tiny_lm key=value ...]
    python -m jaxllm.classify --workdir runs/classify_stdlib --text "from email import message"

Result (AMD EPYC 2-core, from the 200-step tiny_lm, 300 steps x 16 snippets of 256 byte tokens,
569 validation snippets): accuracy 0.490, macro-F1 0.185 (step 150: 0.496 / 0.183); 10 min 54 s wall
with other jobs on the machine. The majority class (encodings) alone is 0.415: at this budget the
classifier learns encodings and little else. See the README results table for the other modes.
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import get_config as tiny_config  # noqa: E402  (experiments build on each other)

# Packages with validation files at the corpus's 5% split (asyncio and tkinter have almost none).
PACKAGES = ("encodings", "idlelib", "distutils", "email", "xml", "lib2to3", "importlib", "multiprocessing")


def get_config() -> config.Config:
    base = tiny_config()
    return dataclasses.replace(
        base,
        workdir="runs/classify_stdlib",
        family="classifier",
        init_from="runs/tiny_lm",
        data=dataclasses.replace(base.data, dataset="stdlib_packages", classes=PACKAGES),
        classifier=config.ClassifierConfig(num_classes=len(PACKAGES)),
        finetune=config.FinetuneConfig(mode="full"),
        train=dataclasses.replace(base.train, steps=300, batch_size=16, seq_len=256, log_every=25,
                                  eval_every=150, eval_batches=36),  # 36 x 16 covers the 569 snippets
        opt=dataclasses.replace(base.opt, learning_rate=1e-3, warmup_steps=30),
        checkpoint=config.CheckpointConfig(every=150, keep=1),
    )


if __name__ == "__main__":
    main.run(get_config)
