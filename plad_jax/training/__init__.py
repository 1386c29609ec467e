"""Training: the jitted train step, the resumable loop and Orbax checkpoints."""
