"""classify_sst2_bert: the textbook transfer-learning case: an imported pre-trained BERT with a new
two-class head (BERT's [CLS] pooler + linear score), fully fine-tuned on GLUE SST-2 sentiment read
through TFDS (array_record, no TensorFlow).

Needs glue/sst2 prepared under a TFDS data_dir and a BERT imported from Hugging Face (both done
where they can be downloaded):

    tfds build glue/sst2 --data_dir=DIR --file_format=array_record
    python -m jaxllm.hf import --hf_dir path/to/bert-base-uncased --workdir runs/bert_base_uncased
    python experiments/classify_sst2_bert.py data.data_dir=DIR [key=value ...]

The model config is the imported run's (init_from must match it); until that run exists it is
bert-base-uncased's shape with the byte tokenizer, so the config still validates and plans.
Evaluation covers the 872 validation sentences once (28 batches of 32).

Result: not measured (no network here to fetch BERT or SST-2).
"""

import dataclasses
import os

from jaxllm import config, main, restore

INIT_FROM = "runs/bert_base_uncased"

# bert-base-uncased (Devlin et al. 2019): what `python -m jaxllm.hf import` writes for it.
BERT_BASE = config.ModelConfig(
    vocab_size=30522, d_model=768, num_layers=12, num_heads=12, mlp_dim=3072, mlp_kind="gelu",
    attention_kind="bidirectional", norm_kind="layernorm", norm_placement="post", embed_norm=True,
    position_kind="learned", max_positions=512, type_vocab_size=2, qkv_bias=True, attn_out_bias=True,
    mlp_bias=True, norm_eps=1e-12, tie_embeddings=True)


def get_config() -> config.Config:
    model = restore.load_config(INIT_FROM).model if os.path.exists(os.path.join(INIT_FROM, "config.json")) else BERT_BASE
    return config.Config(
        workdir="runs/classify_sst2_bert",
        family="classifier",
        init_from=INIT_FROM,
        model=model,
        data=config.DataConfig(dataset="glue/sst2", text_feature="sentence", label_feature="label",
                               train_split="train", eval_split="validation"),
        classifier=config.ClassifierConfig(num_classes=2, backbone="encoder", pooling="first", pooler=True,
                                           score_bias=True),
        finetune=config.FinetuneConfig(mode="full"),
        # BERT's recipe (Devlin et al.): batch 32, lr 2e-5 with 10% warmup, a few thousand steps.
        train=config.TrainConfig(steps=2000, batch_size=32, seq_len=128, log_every=50, eval_every=500,
                                 eval_batches=28),
        opt=config.OptConfig(learning_rate=2e-5, warmup_steps=200, weight_decay=0.01, b2=0.999),
        checkpoint=config.CheckpointConfig(every=500, keep=2),
    )


if __name__ == "__main__":
    main.run(get_config)
