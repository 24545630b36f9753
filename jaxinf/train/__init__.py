"""Training: one step (`step`: AdamW with an optional EMA) and one loop (`loop`: orbax checkpoints
that resume exactly); each trainer supplies only its loss."""
