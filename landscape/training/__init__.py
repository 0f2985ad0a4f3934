"""Training: its configuration, the loop, resumable checkpoints."""
