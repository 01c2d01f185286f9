"""`python -m jaxllm.ensemble`: the command in jaxllm/cli/ensemble.py."""

from jaxllm.cli.ensemble import main

if __name__ == "__main__":
    main()
