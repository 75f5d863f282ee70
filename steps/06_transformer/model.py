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


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention over the encoder's memory, then FFN; each post-LN."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, d_ff)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, memory, tgt_mask, memory_mask):
        """x: (B, T, d_model), memory: (B, S, d_model), tgt_mask: (B, 1, T, T), memory_mask: (B, 1, 1, S)."""
        x = self.norm1(x + self.dropout(self.self_attn(x, x, x, tgt_mask)))  # queries, keys: the target
        x = self.norm2(x + self.dropout(self.cross_attn(x, memory, memory, memory_mask)))  # keys: the source
        return self.norm3(x + self.dropout(self.ffn(x)))  # (B, T, d_model)


class Decoder(nn.Module):
    """Embedder, then N decoder layers, each reading the same memory."""

    def __init__(self, vocab_size: int, d_model: int, n_heads: int, n_layers: int, d_ff: int, max_len: int,
                 dropout: float):
        super().__init__()
        self.embed = Embedder(vocab_size, d_model, max_len, dropout)
        self.layers = nn.ModuleList(DecoderLayer(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))

    def forward(self, tgt, memory, tgt_mask, memory_mask):
        """tgt: (B, T) token ids, memory: (B, S, d_model) -> (B, T, d_model)."""
        x = self.embed(tgt)  # (B, T, d_model)
        for layer in self.layers:
            x = layer(x, memory, tgt_mask, memory_mask)
        return x


class Transformer(nn.Module):
    """Encoder-decoder with one embedding table shared by source, target and the output projection.

    The defaults are the paper's base model: 6 + 6 layers, d_model 512, 8 heads, d_ff 2048, dropout 0.1,
    a shared vocabulary of 37000 tokens.
    """

    def __init__(self, vocab_size: int = 37000, d_model: int = 512, n_heads: int = 8, n_layers: int = 6,
                 d_ff: int = 2048, max_len: int = 512, dropout: float = 0.1, pad_id: int = 0):
        super().__init__()
        self.pad_id = pad_id
        self.encoder = Encoder(vocab_size, d_model, n_heads, n_layers, d_ff, max_len, dropout)
        self.decoder = Decoder(vocab_size, d_model, n_heads, n_layers, d_ff, max_len, dropout)
        self.decoder.embed = self.encoder.embed  # one embedding for both sides
        self.out_proj = nn.Linear(d_model, vocab_size, bias=False)  # the pre-softmax linear transformation
        self.out_proj.weight = self.encoder.embed.tok.weight  # ... shares that matrix too

    def encode(self, src):
        src_mask = padding_mask(src, self.pad_id)  # (B, 1, 1, S)
        return self.encoder(src, src_mask), src_mask  # (B, S, d_model)

    def decode(self, tgt, memory, src_mask):
        tgt_mask = padding_mask(tgt, self.pad_id) & causal_mask(tgt.size(1), tgt.device)  # (B, 1, T, T)
        return self.out_proj(self.decoder(tgt, memory, tgt_mask, src_mask))  # (B, T, vocab_size) logits

    def forward(self, src, tgt):
        """src: (B, S) source ids, tgt: (B, T) target ids starting with BOS -> logits (B, T, vocab_size)."""
        memory, src_mask = self.encode(src)
        return self.decode(tgt, memory, src_mask)

    @torch.no_grad()
    def greedy_decode(self, src, bos_id: int, eos_id: int, max_new_tokens: int) -> torch.Tensor:
        """Feed back the most likely token until every row has said EOS. -> (B, <= max_new_tokens) ids."""
        memory, src_mask = self.encode(src)
        out = torch.full((src.size(0), 1), bos_id, dtype=torch.long, device=src.device)  # (B, 1)
        done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)  # (B,) rows that have said EOS
        for _ in range(max_new_tokens):
            nxt = self.decode(out, memory, src_mask)[:, -1].argmax(-1)  # (B,) most likely next token
            nxt = nxt.masked_fill(done, self.pad_id)  # rows that are finished only pad
            out = torch.cat([out, nxt[:, None]], dim=1)  # (B, t + 1)
            done |= nxt == eos_id
            if done.all():
                break
        return out[:, 1:]  # (B, <= max_new_tokens): BOS dropped
