"""Token embeddings scaled by sqrt(d_model), sinusoidal positions, dropout: a bigram model."""
