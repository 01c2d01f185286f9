"""distill_tiny: knowledge distillation on the tiny_lm setup. The teacher is the tiny_lm model
(d_model 256, 4 layers); the student has half its width (d_model 128, same depth), and is trained
with forward KL to the teacher's next-token distribution blended 50/50 with the hard next-token
loss. If the teacher has no checkpoint yet, the run trains it first (distill.teacher_train_steps
steps, same data, optimizer and batches) in runs/distill_tiny_teacher.

    python experiments/distill_tiny.py                                    # teacher (if missing), then distilled student
    python experiments/distill_tiny.py distill.teacher_workdir= workdir=runs/distill_tiny_scratch   # student from scratch

Result (shared 2-core CPU, defaults; validation bits per byte, 8 eval batches): teacher (300 steps)
2.712; student from scratch (200 steps) 2.852; distilled student (200 steps, same batches) 2.747,
top-1 agreement with the teacher 0.79 on the last training batch.
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import comparison_config as tiny_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = tiny_config()
    teacher = base.model  # d_model 256, 4 layers
    student = dataclasses.replace(base.model, d_model=128, num_heads=2, num_kv_heads=2, mlp_dim=352)
    return dataclasses.replace(
        base,
        workdir="runs/distill_tiny",
        model=student,
        # Shorter rows than tiny_lm so that three runs fit a shared 2-core CPU in ~15 minutes.
        train=dataclasses.replace(base.train, steps=200, seq_len=128),
        distill=config.DistillConfig(
            teacher_workdir="runs/distill_tiny_teacher",
            teacher=teacher,
            teacher_train_steps=300,
            loss="forward_kl",
            temperature=1.0,
            alpha=0.5,
        ),
    )


if __name__ == "__main__":
    main.run(get_config)
