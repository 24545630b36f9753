"""Training: diffusion losses, AdamW with EMA, orbax checkpoints that resume exactly."""
