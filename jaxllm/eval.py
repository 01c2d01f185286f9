"""`python -m jaxllm.eval`: the command in jaxllm/cli/eval.py."""

from jaxllm.cli.eval import main

if __name__ == "__main__":
    main()
