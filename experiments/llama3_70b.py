"""llama3_70b: a Llama-3-70B-shaped model (80 layers, d_model 8192, GQA 64/8 heads, SwiGLU 28672,
vocab 128256) for a TPU v5p-512 slice (256 chips): fsdp over every chip, one 8192-token row per
chip, bfloat16 compute, full remat, the loss in 1024-position chunks. Plan it from any host:

    python -m jaxllm.plan experiments/llama3_70b.py --topology v5p-512

and launch it on the slice (every host the same command):

    python experiments/llama3_70b.py model.tokenizer=/path/tokenizer data.dataset=... distributed.auto=true

Planned figures: README and benchmarks/README ("Pod-scale plans").
"""

import dataclasses

from jaxllm import config, main

from llama3_8b import get_config as llama3_8b_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = llama3_8b_config()
    return dataclasses.replace(
        base,
        workdir="runs/llama3_70b",
        model=dataclasses.replace(base.model, d_model=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                                  mlp_dim=28672),
        train=dataclasses.replace(base.train, batch_size=256),
    )


if __name__ == "__main__":
    main.run(get_config)
