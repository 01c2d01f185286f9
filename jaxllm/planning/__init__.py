"""Ahead-of-time plans of runs for TPU topologies (jaxllm.plan)."""
