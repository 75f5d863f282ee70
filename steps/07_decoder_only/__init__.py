"""A decoder-only language model over GPT-2 BPE tokens: no encoder, no cross-attention, a padding mask."""
