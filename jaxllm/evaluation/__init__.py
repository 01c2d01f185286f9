"""lm-evaluation-harness integration (the optional `eval` extra): jaxllm runs as an lm-eval model
(harness.py), task lookup, evaluation and reporting (runner.py), the embedded offline tasks
(tasks/: YAML + JSONL, built by build_tasks.py). The command is `python -m jaxllm.eval`."""

import os

# Evaluation is offline: Hugging Face datasets and hub never reach the network unless the
# environment asks for it (read when `datasets` is first imported, so set before that).
for _name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
    os.environ.setdefault(_name, "1")

try:
    from jaxllm.evaluation import harness, runner
    OPTIONAL_IMPORT_ERROR = None
except ImportError as e:  # lm-eval is an optional extra: the command says how to install it
    if not (e.name or "").split(".")[0] in ("lm_eval", "datasets"):
        raise
    harness = runner = None
    OPTIONAL_IMPORT_ERROR = e
