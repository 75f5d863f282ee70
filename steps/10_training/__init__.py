"""Training from scratch: GPT-2's init, AdamW, a data loader, a live log, checkpoints that resume exactly."""
