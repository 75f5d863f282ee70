"""Gradient accumulation: a total batch of 524,288 tokens from micro-batches, each loss divided by their number."""
