"""Command-line tools, thin: parse the arguments, call the library, print. Each is also
`python -m jaxllm.<name>` (jaxllm/<name>.py)."""

import os

# Before jax or tensorflow_datasets start: their C++ logging is noise for a tool's user.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
