"""llama3_8b: a Llama-3-8B-shaped model (32 layers, d_model 4096, GQA 32/8 heads, SwiGLU 14336,
vocab 128256, RoPE theta 5e5) for a TPU v5p-128 slice (64 chips): fsdp over every chip, one 8192-
token row per chip, bfloat16 compute, full remat, splash attention on TPU, the loss in 1024-position
chunks. Plan it from any host before launching:

    python -m jaxllm.plan experiments/llama3_8b.py --topology v5p-128

and launch it on the slice (every host the same command) with a Llama 3 tokenizer.json:

    python experiments/llama3_8b.py model.tokenizer=/path/Meta-Llama-3-8B data.dataset=... distributed.auto=true

Planned figures (memory, XLA's step time, MFU, side by side with MaxText): README and benchmarks/README.
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import get_config as tiny_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = tiny_config()
    return dataclasses.replace(
        base,
        workdir="runs/llama3_8b",
        model=dataclasses.replace(
            base.model, vocab_size=128256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
            mlp_dim=14336, rope_theta=500_000.0, norm_eps=1e-5, tie_embeddings=False,
            dtype="bfloat16", remat="full", attention_impl="auto",
        ),
        mesh=config.MeshConfig(data=1, fsdp=-1, tensor=1, expert=1),
        train=dataclasses.replace(base.train, steps=100_000, batch_size=64, seq_len=8192, loss_chunk=1024, log_every=10,
                                  eval_every=1000, eval_batches=4),
        opt=dataclasses.replace(base.opt, learning_rate=3e-4, warmup_steps=2000),
        checkpoint=config.CheckpointConfig(every=1000, keep=2),
        sample_tokens=0,
    )


if __name__ == "__main__":
    main.run(get_config)
