"""torch.compile and flash attention (F.scaled_dot_product_attention), and no needless copies of the data."""
