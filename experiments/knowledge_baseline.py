"""knowledge_baseline: knowledge_tiny_lm without the fused facts (data.transform=""): the pre-trained
tiny_lm fine-tuned for the same steps with the same seed, schedule and batch positions on the plain
corpus. The kg_* options stay as in knowledge_tiny_lm (unused in training) so that
`python -m jaxllm.qa` asks both runs the same questions.

    python experiments/knowledge_baseline.py init_from=runs/tiny_lm
    python -m jaxllm.qa --workdir runs/knowledge_baseline

Result (same machine and session as knowledge_tiny_lm; 805 s wall): training loss 1.311 at step
300, validation 1.368 / 1.973 bits per byte. QA exact match 0.000 on all 300 questions in both
phrasings; the right answer's bits per byte 3.199 fused / 3.361 held out (question phrasing), 3.187
/ 3.375 (fused phrasing); the pre-trained tiny_lm before fine-tuning: 3.695 / 3.856 and 3.746 /
3.932.
"""

import dataclasses

from jaxllm import config, main

from knowledge_tiny_lm import get_config as knowledge_config  # noqa: E402  (experiments build on each other)


def get_config() -> config.Config:
    base = knowledge_config()
    return dataclasses.replace(base, workdir="runs/knowledge_baseline",
                               data=dataclasses.replace(base.data, transform=""))


if __name__ == "__main__":
    main.run(get_config)
