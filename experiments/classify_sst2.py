"""classify_sst2: sentiment classification (GLUE SST-2, positive/negative sentences) by fine-tuning
all of tiny_lm's pre-trained byte-level model with a new two-class score head.

It needs glue/sst2 prepared as array_record under a TFDS data_dir (done elsewhere, where the data
can be downloaded: `tfds build glue/sst2 --data_dir=DIR --file_format=array_record`), and a trained
tiny_lm run to start from:

    python experiments/tiny_lm.py
    python experiments/classify_sst2.py data.data_dir=DIR [key=value ...]

Evaluation covers the 872 validation sentences once (28 batches of 32; the last one padded with
weight-0 rows).

Result: not measured yet.
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import get_config as tiny_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = tiny_config()
    return dataclasses.replace(
        base,
        workdir="runs/classify_sst2",
        family="classifier",
        init_from="runs/tiny_lm",
        data=dataclasses.replace(
            base.data, dataset="glue/sst2", text_feature="sentence", label_feature="label",
            train_split="train", eval_split="validation",
        ),
        classifier=config.ClassifierConfig(num_classes=2),
        finetune=config.FinetuneConfig(mode="full"),
        # SST-2 sentences are short: 256 byte tokens keep almost all of them whole.
        train=dataclasses.replace(base.train, steps=600, batch_size=32, seq_len=256, eval_every=200,
                                  eval_batches=28),
        opt=dataclasses.replace(base.opt, learning_rate=3e-4, warmup_steps=50),
        checkpoint=dataclasses.replace(base.checkpoint, every=200),
    )


if __name__ == "__main__":
    main.run(get_config)
