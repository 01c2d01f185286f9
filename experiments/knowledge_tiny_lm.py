"""knowledge_tiny_lm: the pre-trained tiny_lm fine-tuned on the standard-library corpus with facts
from its own knowledge graph fused into every document that mentions them (data.transform=kg_facts:
a "# fact: ..." preamble of at most 32 facts; 30 % of the triples, by hash, held out and never fused).

    python experiments/knowledge_tiny_lm.py init_from=runs/tiny_lm
    python -m jaxllm.qa --workdir runs/knowledge_tiny_lm

The comparison is experiments/knowledge_baseline.py: the same steps, seed, schedule and batch
positions, the documents without facts. Both are evaluated on the same questions
(jaxllm/knowledge/qa.py).

Result: see the end of this docstring (filled in from the measured run).
"""

import dataclasses

from jaxllm import config, main

from tiny_lm import get_config as tiny_lm_config  # noqa: E402  (experiments build on each other)

STEPS = 300


def get_config() -> config.Config:
    base = tiny_lm_config()
    return dataclasses.replace(
        base,
        workdir="runs/knowledge_tiny_lm",
        init_from="runs/tiny_lm",
        train=dataclasses.replace(base.train, steps=STEPS, eval_every=STEPS),
        opt=dataclasses.replace(base.opt, learning_rate=1e-3, warmup_steps=10),
        data=dataclasses.replace(base.data, transform="kg_facts", kg_format="preamble", kg_max_facts=32,
                                 kg_held_out=0.3),
        checkpoint=dataclasses.replace(base.checkpoint, every=STEPS),
    )


if __name__ == "__main__":
    main.run(get_config)
