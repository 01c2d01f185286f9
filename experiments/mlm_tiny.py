"""mlm_tiny: masked-LM pre-training (BERT's objective) of a small byte-level bidirectional encoder
on the embedded corpus (Python's standard library source): 40% of the bytes chosen (BERT's 15%
supervises too few positions for a run this short; Wettig et al. 2022, "Should you mask 15% in
masked language modeling?", found 40% better), 80% of those [MASK], 10% a random byte, 10% kept;
the loss and the accuracy are on the chosen bytes.

    python experiments/mlm_tiny.py [key=value ...]      # e.g. mlm.whole_word=true

The encoder is a pre-LN BERT (LayerNorm with biases, learned absolute positions, GELU MLP with
biases; the decoder's block from the same registries) of the width and depth of clm_tiny.py, which
trains the same network causally for the classification comparison (classify_stdlib_encoder.py).

Result: see the README results table (masked-byte accuracy against the unigram baseline).
"""

from jaxllm import config, main

STEPS = 300


def model_config(attention_kind: str = "bidirectional") -> config.ModelConfig:
    """The network mlm_tiny and clm_tiny share (clm_tiny: causal attention)."""
    return config.ModelConfig(
        d_model=128, num_layers=4, num_heads=4, mlp_dim=512, vocab_size=384, attention_kind=attention_kind,
        mlp_kind="gelu", mlp_bias=True, qkv_bias=True, attn_out_bias=True, norm_kind="layernorm",
        norm_placement="pre", position_kind="learned", max_positions=128, norm_eps=1e-5)


def get_config() -> config.Config:
    return config.Config(
        workdir="runs/mlm_tiny",
        family="masked_lm",
        model=model_config(),
        train=config.TrainConfig(steps=STEPS, batch_size=16, seq_len=128, log_every=25, eval_every=150,
                                 eval_batches=16),
        opt=config.OptConfig(learning_rate=2e-3, warmup_steps=30),
        checkpoint=config.CheckpointConfig(every=150, keep=1),
        mlm=config.MaskedLMConfig(rate=0.4),
    )


if __name__ == "__main__":
    main.run(get_config)
