"""mixtral_8x7b: a Mixtral-8x7B-shaped MoE (32 layers, d_model 4096, GQA 32/8 heads, 8 SwiGLU experts
of 14336, top-2 with softmax over the chosen two, vocab 32000, RoPE theta 1e6) for a TPU v5p-256
slice (128 chips) as expert=8 x fsdp=16, one 4096-token row per chip, bfloat16, full remat.
Tokens go to experts with capacity 1.25 (GShard): dropless expert parallelism reserves each
device's worst-case load (all tokens to one device) and so runs 4x the expert matmuls here
(model.moe.dispatch=dropless to compare; benchmarks/README "Pod-scale plans"):

    python -m jaxllm.plan experiments/mixtral_8x7b.py --topology v5p-256

and launch it on the slice (every host the same command):

    python experiments/mixtral_8x7b.py model.tokenizer=/path/tokenizer data.dataset=... distributed.auto=true

Planned figures: README and benchmarks/README ("Pod-scale plans").
"""

import dataclasses

from jaxllm import config, main

from llama3_8b import get_config as llama3_8b_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = llama3_8b_config()
    return dataclasses.replace(
        base,
        workdir="runs/mixtral_8x7b",
        model=dataclasses.replace(
            base.model, vocab_size=32000, rope_theta=1_000_000.0,
            moe=config.MoeConfig(num_experts=8, top_k=2, router="topk_softmax", dispatch="capacity",
                                 capacity_factor=1.25),
        ),
        mesh=config.MeshConfig(data=1, fsdp=-1, tensor=1, expert=8),
        train=dataclasses.replace(base.train, batch_size=128, seq_len=4096),
    )


if __name__ == "__main__":
    main.run(get_config)
