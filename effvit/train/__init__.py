"""Training: loop, train state, optimizer, sharding, checkpointing, metric writing."""
