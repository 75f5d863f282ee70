"""Scaled dot-product attention, multi-head attention, padding and causal masks."""
