"""The decoder layer: masked self-attention, cross-attention over a memory, FFN; the causal mask."""
