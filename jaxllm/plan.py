"""`python -m jaxllm.plan`: the command in jaxllm/cli/plan.py."""

from jaxllm.cli.plan import main

if __name__ == "__main__":
    main()
