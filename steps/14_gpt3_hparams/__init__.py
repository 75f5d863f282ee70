"""GPT-3's recipe: AdamW (0.9, 0.95), clipping at 1.0, warmup + cosine decay, weight decay on matrices only."""
