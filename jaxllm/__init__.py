"""jaxllm: sharded decoder-only language models in JAX/Flax."""
