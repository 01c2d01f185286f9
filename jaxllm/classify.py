"""`python -m jaxllm.classify`: the command in jaxllm/cli/classify.py."""

from jaxllm.cli.classify import main

if __name__ == "__main__":
    main()
