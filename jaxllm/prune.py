"""`python -m jaxllm.prune`: the command in jaxllm/cli/prune.py."""

from jaxllm.cli.prune import main

if __name__ == "__main__":
    main()
