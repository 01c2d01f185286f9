"""soup_classify: classify_stdlib fine-tuned several times from one pre-trained tiny_lm (different
data orders and learning rates, the same score-head init), then their uniform soup, greedy soup
and prediction ensemble. Shorter rows and fewer steps than classify_stdlib so that the ingredients
fit in a few minutes each on a 2-core CPU.

    python experiments/tiny_lm.py
    python experiments/soup_classify.py workdir=runs/soup_a                                   # and:
    python experiments/soup_classify.py workdir=runs/soup_b data.seed=1
    python experiments/soup_classify.py workdir=runs/soup_c data.seed=2 opt.learning_rate=5e-4
    python experiments/soup_classify.py workdir=runs/soup_d data.seed=3 opt.learning_rate=2e-3
    python -m jaxllm.soup --workdir runs/soup_a ... --workdir runs/soup_d --out runs/soup_uniform
    python -m jaxllm.soup --workdir runs/soup_a ... --workdir runs/soup_d --out runs/soup_greedy \
        --greedy --held_out_batches 18 --held_out_stride 2                # ranks on the even batches
    python -m jaxllm.ensemble --workdir runs/soup_a ... --workdir runs/soup_d --rule mean_prob \
        --first_batch 1 --batch_stride 2 --eval_batches 18                # reports on the odd ones

The validation split is in class order, so the greedy soup ranks on the even validation batches
(288 snippets) and everything is reported on the odd ones (281 snippets; the majority class,
encodings, is 0.431 of them).

Result (2-core CPU shared with other jobs, from /tmp/exp/runs/tiny_lm, 100 steps x 16 x 128
tokens; 147-438 s per ingredient), accuracy / macro-F1 / loss on the odd batches: ingredients
a (lr 1e-3) 0.434 / 0.136 / 1.711, b (data seed 1) 0.466 / 0.138 / 1.496, c (seed 2, lr 5e-4)
0.470 / 0.139 / 1.473, d (seed 3, lr 2e-3) 0.402 / 0.131 / 1.673; uniform soup 0.448 / 0.139 /
1.645; greedy soup (kept c, then b; a and d rejected) 0.470 / 0.138 / 1.564, equal to the best
ingredient in accuracy and worse in loss; ensembles mean_prob 0.466 / 0.139 / 1.522, mean_logit
0.466 / 0.140 / 1.517, vote 0.463 / 0.138. At this budget every model sits within 4 points of the
majority class, so none of these differences is established.
"""

import dataclasses

from jaxllm import config, main

from classify_stdlib import get_config as classify_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = classify_config()
    return dataclasses.replace(
        base,
        workdir="runs/soup_a",
        train=dataclasses.replace(base.train, steps=100, batch_size=16, seq_len=128, log_every=25,
                                  eval_every=100, eval_batches=36),
        opt=dataclasses.replace(base.opt, learning_rate=1e-3, warmup_steps=20),
        checkpoint=config.CheckpointConfig(every=100, keep=1),
    )


if __name__ == "__main__":
    main.run(get_config)
