"""GPT-2 (Radford et al., 2019): the decoder-only Transformer of step 07 with GPT-2's changes and names."""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class GPTConfig:
    """GPT-2 small (124M) by default. Medium, large and XL have (n_layer, n_head, n_embd) =
    (24, 16, 1024), (36, 20, 1280) and (48, 25, 1600)."""

    block_size: int = 1024  # the context: learned positions 0..1023
    vocab_size: int = 50257  # GPT-2's BPE tokens
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768  # d_model; the MLP is 4 * n_embd wide
    dropout: float = 0.1

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")


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


def causal_mask(T: int, device=None) -> torch.Tensor:
    """(1, 1, T, T): True on and below the diagonal, so position t sees positions 0..t only."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None]


def padded_causal_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) attention mask, 1 at real tokens and 0 at padding -> (B, 1, T, T) bool.

    Causal, and no query looks at a pad. A pad looks at itself, so that no row of the softmax is all -inf.
    """
    T = attention_mask.size(1)
    real = rearrange(attention_mask.bool(), "b s -> b 1 1 s")  # (B, 1, 1, T): keys that are real tokens
    itself = torch.eye(T, dtype=torch.bool, device=attention_mask.device)  # (T, T)
    return causal_mask(T, attention_mask.device) & (real | itself)  # (B, 1, T, T)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with W^Q, W^K, W^V fused into one matrix, c_attn: one matmul instead of three."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # [W^Q | W^K | W^V], all heads side by side
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # W^O

    def forward(self, x, mask):
        """x: (B, T, n_embd), mask: (B, 1, T, T) -> (B, T, n_embd)."""
        qkv = self.c_attn(x)  # (B, T, 3 * n_embd)
        q, k, v = rearrange(qkv, "b t (three h d) -> three b h t d", three=3, h=self.n_head)  # each (B, H, T, d_k)
        out, _ = attention(q, k, v, mask)  # (B, H, T, d_k)
        return self.c_proj(rearrange(out, "b h t d -> b t (h d)"))  # heads side by side again


class MLP(nn.Module):
    """The position-wise FFN, 4 * n_embd wide, with GELU (tanh approximation, as GPT-2 computed it) for ReLU."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # (B, T, n_embd) -> (B, T, 4 n_embd) -> back


class Block(nn.Module):
    """Pre-LN: x + attn(ln_1(x)), then x + mlp(ln_2(x)). The residual stream itself is never normalised."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask):
        """x: (B, T, n_embd), mask: (B, 1, T, T)."""
        x = x + self.dropout(self.attn(self.ln_1(x), mask))  # the sub-layer sees a normalised copy of x
        return x + self.dropout(self.mlp(self.ln_2(x)))  # (B, T, n_embd)


class GPT(nn.Module):
    """GPT-2: token + learned position embeddings, n_layer pre-LN blocks, a final LayerNorm, the tied lm_head.

    The parameter names are those of HF's GPT2LMHeadModel (transformer.wte, transformer.h.0.attn.c_attn, ...).
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # tokens, no longer scaled by sqrt(d_model)
            wpe=nn.Embedding(config.block_size, config.n_embd),  # positions: learned, not a sinusoid
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd),  # pre-LN leaves the last block's output unnormalised
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: one (vocab_size, n_embd) matrix, used twice
        for table in (self.transformer.wte, self.transformer.wpe):  # as in step 07: rows of norm about 1, so the
            nn.init.normal_(table.weight, std=config.n_embd**-0.5)  # tied logits start of order 1, not sqrt(n_embd)

    def forward(self, idx, targets=None, attention_mask=None):
        """idx: (B, T) token ids; targets: (B, T), idx shifted left by one; attention_mask: (B, T), 0 at padding.

        Returns logits (B, T, vocab_size) and the cross-entropy loss against the targets (None without them).
        """
        T = idx.size(1)
        if attention_mask is None:
            mask, pos = causal_mask(T, idx.device), torch.arange(T, device=idx.device)  # (1, 1, T, T), (T,)
        else:
            mask = padded_causal_mask(attention_mask)  # (B, 1, T, T)
            pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at the first real token
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, n_embd)
        for block in self.transformer.h:
            x = block(x, mask)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, vocab_size)
        # cross_entropy over B*T rows: logits (B*T, vocab_size), targets (B*T,)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, attention_mask=None, temperature: float = 1.0, generator=None):
        """Sample a token from softmax(logits / temperature), append it, repeat. -> (B, T + max_new_tokens) ids."""
        if attention_mask is None:
            attention_mask = torch.ones_like(idx)
        for _ in range(max_new_tokens):
            crop = -self.config.block_size  # the model sees the last block_size tokens at most
            logits = self(idx[:, crop:], attention_mask=attention_mask[:, crop:])[0][:, -1]  # (B, vocab_size)
            nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)  # (B, t + 1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(nxt)], dim=1)  # (B, t + 1): new token is real
        return idx
