"""Data parallelism: N processes under torchrun, each its own slice of every batch; gradients averaged across them."""
