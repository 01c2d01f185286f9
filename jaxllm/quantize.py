"""`python -m jaxllm.quantize`: the command in jaxllm/cli/quantize.py."""

from jaxllm.cli.quantize import main

if __name__ == "__main__":
    main()
