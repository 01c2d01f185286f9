"""`python -m jaxllm.soup`: the command in jaxllm/cli/soup.py."""

from jaxllm.cli.soup import main

if __name__ == "__main__":
    main()
