"""`python -m jaxllm.qa`: the command in jaxllm/cli/qa.py."""

from jaxllm.cli.qa import main

if __name__ == "__main__":
    main()
