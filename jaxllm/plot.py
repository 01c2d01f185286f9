"""`python -m jaxllm.plot`: the command in jaxllm/cli/plot.py."""

from jaxllm.cli.plot import main

if __name__ == "__main__":
    main()
