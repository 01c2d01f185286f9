"""Exact-match accuracy of a run's greedy answers to questions from its knowledge graph
(jaxllm/knowledge/qa.py explains the questions and their parts).

    python -m jaxllm.qa --workdir runs/knowledge_tiny_lm [--examples 5] [--out qa.json]
    python -m jaxllm.qa --workdir runs/tiny_lm --questions_from runs/knowledge_tiny_lm
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from jaxllm import restore
from jaxllm.config import ConfigError
from jaxllm.knowledge import qa


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Question answering from a jaxllm run's knowledge graph.")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--examples", type=int, default=0, help="also print this many questions and answers")
    parser.add_argument("--out", default="", help="also write the result to this JSON file")
    parser.add_argument("--questions_from", default="",
                        help="ask the questions of this run's data options (default: --workdir's own)")
    args = parser.parse_args(argv)
    if args.examples < 0:
        parser.error(f"--examples {args.examples} must be 0 or more")
    try:
        qs = qa.questions(restore.load_config(args.questions_from).data) if args.questions_from else None
        result = qa.evaluate(args.workdir, qs, examples=args.examples)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
