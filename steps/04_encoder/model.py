"""The Transformer of "Attention Is All You Need" (Vaswani et al., 2017), built up step by step."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
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


def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d_k)) v.  q: (B, H, T, d_k), k and v: (B, H, S, d_k).

    mask: bool, broadcastable to (B, H, T, S), True where query t may look at key s.
    Returns the output (B, H, T, d_k) and the attention weights (B, H, T, S).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)  # (B, H, T, S), each row sums to 1
    return weights @ v, weights  # (B, H, T, d_k), (B, H, T, S)


def padding_mask(idx: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, S) token ids -> (B, 1, 1, S): False at padding, so no query looks at a pad."""
    return rearrange(idx != pad_id, "b s -> b 1 1 s")


def causal_mask(T: int, device=None) -> torch.Tensor:
    """(1, 1, T, T): True on and below the diagonal, so position t sees positions 0..t only."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        assert d_model % n_heads == 0, f"d_model {d_model} is not divisible by n_heads {n_heads}"
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)  # all heads' W^Q side by side
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)  # W^O

    def forward(self, query, key, value, mask=None):
        """query: (B, T, d_model); key, value: (B, S, d_model) -> (B, T, d_model)."""
        q = rearrange(self.q_proj(query), "b t (h d) -> b h t d", h=self.n_heads)  # (B, H, T, d_k)
        k = rearrange(self.k_proj(key), "b s (h d) -> b h s d", h=self.n_heads)  # (B, H, S, d_k)
        v = rearrange(self.v_proj(value), "b s (h d) -> b h s d", h=self.n_heads)  # (B, H, S, d_k)
        out, _ = attention(q, k, v, mask)  # (B, H, T, d_k)
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))  # heads side by side again


class FeedForward(nn.Module):
    """FFN(x) = max(0, x W1 + b1) W2 + b2: one MLP, applied at every position with the same weights."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))  # (B, T, d_model) -> (B, T, d_ff) -> (B, T, d_model)


class EncoderLayer(nn.Module):
    """Self-attention, then FFN; each sub-layer wrapped as LayerNorm(x + Dropout(sublayer(x))) (post-LN)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        x = self.norm1(x + self.dropout(self.self_attn(x, x, x, mask)))  # (B, S, d_model)
        return self.norm2(x + self.dropout(self.ffn(x)))  # (B, S, d_model)


class Encoder(nn.Module):
    """Embedder, then N encoder layers. Padding positions are hidden from every query by the mask."""

    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, d_ff: int, max_len: int,
                 dropout: float):
        super().__init__()
        self.embed = Embedder(vocab_size, d_model, max_len, dropout)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))

    def forward(self, src, src_mask):
        """src: (B, S) token ids, src_mask: (B, 1, 1, S) -> memory (B, S, d_model)."""
        x = self.embed(src)  # (B, S, d_model)
        for layer in self.layers:
            x = layer(x, src_mask)
        return x
