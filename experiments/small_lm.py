"""small_lm: a ~100M-parameter configuration for a real accelerator (GPU host or TPU slice), with
fsdp and tensor sharding and bfloat16 compute.

    python experiments/small_lm.py mesh.fsdp=4 mesh.tensor=2      # 8 devices
    python experiments/small_lm.py mesh.tensor=1 model.attention_impl=cudnn   # one NVIDIA GPU

On one H100 (32 rows of 1024 tokens a step, benchmarks/train_throughput.py --configs small): MFU
0.198 with the XLA attention, 0.307 with cuDNN's fused attention, 0.391 with cuDNN and
model.remat=none (13 GB at that batch).

Parameters: see README (counted by tests/experiments_test.py).
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import get_config as tiny_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = tiny_config()
    return dataclasses.replace(
        base,
        workdir="runs/small_lm",
        model=dataclasses.replace(
            base.model, d_model=768, num_layers=12, num_heads=12, num_kv_heads=4, mlp_dim=2816,
            dtype="bfloat16", remat="save_dots",
        ),
        mesh=config.MeshConfig(data=1, fsdp=-1, tensor=2, expert=1),
        train=dataclasses.replace(base.train, steps=20_000, batch_size=256, seq_len=1024,
                                  log_every=50, eval_every=1000),
        opt=dataclasses.replace(base.opt, learning_rate=6e-4, warmup_steps=1000),
        checkpoint=config.CheckpointConfig(every=1000, keep=3),
    )


if __name__ == "__main__":
    main.run(get_config)
