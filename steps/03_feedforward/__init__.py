"""Position-wise feed-forward net, residual connections, post-LayerNorm: one full block."""
