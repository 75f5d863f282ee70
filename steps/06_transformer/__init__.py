"""The full encoder-decoder of "Attention Is All You Need": shared embeddings, greedy decoding."""
