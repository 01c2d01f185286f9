"""vlm_digits: the embedded vision-language task. A small ViT over scikit-learn's bundled 8x8
handwritten digits, projected into a pre-trained tiny_lm as 16 image tokens before the question
(prefix-LM: image and question bidirectional, answer causal, loss on the answer only). Questions:
"what digit is this?" (answer "seven"), "is it even?", "is it greater than four?" ("yes"/"no");
359 validation images (20%, never trained on). Everything trains (LLaVA's stage 2 with the tower
trained too, since it starts from scratch); vlm_digits_blind.py is the same run without the image.

    python experiments/tiny_lm.py
    python experiments/vlm_digits.py [init_from=runs/tiny_lm key=value ...]
    python -m jaxllm.generate --workdir runs/vlm_digits --image digit.png --prompt "what digit is this?" --temperature 0
    python benchmarks/multimodal.py answers runs/vlm_digits runs/vlm_digits_blind

Result: see the README results table (benchmarks/multimodal.py answers: greedy answers with the
image prefilled into the KV cache, exact match per question).
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import get_config as tiny_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = tiny_config()
    return dataclasses.replace(
        base,
        workdir="runs/vlm_digits",
        family="vlm",
        init_from="runs/tiny_lm",
        model=dataclasses.replace(base.model, attention_kind="prefix_lm"),
        vision=config.VisionConfig(image_size=8, patch_size=2, channels=1, d_model=128, num_layers=2,
                                   num_heads=4, mlp_dim=352, posemb="learned", projector="mlp"),
        data=dataclasses.replace(base.data, dataset="digits"),
        train=dataclasses.replace(base.train, steps=400, batch_size=32, seq_len=40, log_every=25,
                                  eval_every=200, eval_batches=34),  # 34 x 32 covers the 1,077 questions
        opt=dataclasses.replace(base.opt, learning_rate=1e-3, warmup_steps=30),
        checkpoint=config.CheckpointConfig(every=200, keep=1),
    )


if __name__ == "__main__":
    main.run(get_config)
