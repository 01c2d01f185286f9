"""`python -m jaxllm.generate`: the command in jaxllm/cli/generate.py."""

from jaxllm.cli.generate import main

if __name__ == "__main__":
    main()
