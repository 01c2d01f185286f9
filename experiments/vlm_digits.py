"""vlm_digits: the embedded vision-language task. A small ViT over scikit-learn's bundled 8x8
handwritten digits (the whole image one patch, rotated by up to 10 degrees in training), projected
into a small byte-level decoder as one image token before the question (prefix-LM: image and
question bidirectional, answer causal, loss on the answer only). Questions:
"what digit is this?" (answer "seven"), "is it even?", "is it greater than four?" ("yes"/"no");
359 validation images (20%, never trained on). Both towers start from scratch and everything trains;
vlm_digits_blind.py is the same run without the image. A pre-trained decoder works the same way:
`init_from=runs/tiny_lm model.d_model=256 model.num_layers=4 model.mlp_dim=704` (tiny_lm's shape).

    python experiments/vlm_digits.py [key=value ...]
    python -m jaxllm.generate --workdir runs/vlm_digits --image digit.png --prompt "what digit is this?" --temperature 0
    python benchmarks/multimodal.py answers runs/vlm_digits runs/vlm_digits_blind

Result (AMD EPYC 2-core, shared with other jobs; 3000 steps x 32 questions, ~10 min wall): greedy
answers with the image prefilled into the KV cache (benchmarks/multimodal.py answers) are exactly
right for 0.988 of the 1,077 validation questions: digit name 0.983, "is it even?" 0.992, "is it
greater than four?" 0.989 (the blind run: see vlm_digits_blind.py). Without the rotation 0.985
(digit name 0.983, validation loss 0.038 vs 0.020). With 2x2 patches (16 image tokens) the towers
overfit: digit name 0.866 at 3000 steps, 0.883 at 5000; augmenting those with whole-pixel shifts
made it worse (0.695 of all questions at 5000 steps).
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
        model=dataclasses.replace(base.model, d_model=128, num_layers=2, mlp_dim=352, attention_kind="prefix_lm"),
        # One patch: the whole 8x8 image is one image token (2x2 patches overfit the 1,438 images).
        vision=config.VisionConfig(image_size=8, patch_size=8, channels=1, d_model=128, num_layers=2,
                                   num_heads=4, mlp_dim=352, posemb="learned", projector="linear"),
        data=dataclasses.replace(base.data, dataset="digits", augment_rotate=10.0),
        train=dataclasses.replace(base.train, steps=3000, batch_size=32, seq_len=40, log_every=50,
                                  eval_every=1000, eval_batches=34),  # 34 x 32 covers the 1,077 questions
        opt=dataclasses.replace(base.opt, learning_rate=3e-3, warmup_steps=30),
        checkpoint=config.CheckpointConfig(every=1000, keep=1),
    )


if __name__ == "__main__":
    main.run(get_config)
