"""`python -m jaxllm.hf`: the command in jaxllm/cli/hf.py."""

from jaxllm.cli.hf import main

if __name__ == "__main__":
    main()
