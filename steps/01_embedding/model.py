"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), built up step by step."""
import math

import torch
import torch.nn as nn
from einops import rearrange


def sinusoidal_table(max_len: int, d_model: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d_model)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d_model))."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (max_len, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (d_model/2,)
    angle = pos * inv_freq  # (max_len, d_model/2)
    table = torch.stack([angle.sin(), angle.cos()], dim=-1)  # (max_len, d_model/2, 2): sin, cos side by side
    return rearrange(table, "pos i two -> pos (i two)").float()  # (max_len, d_model), channels interleaved


class Embedder(nn.Module):
    """Token embedding * sqrt(d_model) + sinusoidal position, then dropout."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, dropout: float):
        super().__init__()
        self.d_model = d_model
        self.tok = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.tok.weight, std=d_model**-0.5)  # so that tok * sqrt(d_model) has unit scale
        self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)  # (max_len, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)  # idx: (B, T) token ids
        x = self.tok(idx) * math.sqrt(self.d_model) + self.pe[:T]  # (B, T, d_model)
        return self.dropout(x)
