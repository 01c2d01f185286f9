"""Training: optimizer, train state born sharded, jitted steps and loop, checkpoints, logging."""
