"""Copy our weights into the reference implementations, so that a test compares outputs on the same weights.

References: torch.nn's Transformer modules, and HF's Marian (the 2017 architecture in `transformers`:
post-LN, sinusoidal positions, embeddings * sqrt(d_model), shared embeddings, ReLU FFN when asked).
"""
import re

import torch
import torch.nn as nn
from transformers import MarianConfig


def marian_config(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=64, pad_id=0):
    return MarianConfig(
        vocab_size=vocab_size, d_model=d_model, encoder_layers=n_layers, decoder_layers=n_layers,
        encoder_attention_heads=n_heads, decoder_attention_heads=n_heads, encoder_ffn_dim=d_ff, decoder_ffn_dim=d_ff,
        activation_function="relu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        max_position_embeddings=max_len, scale_embedding=True, pad_token_id=pad_id, decoder_start_token_id=pad_id,
        eos_token_id=1, forced_eos_token_id=None, attn_implementation="eager",
    )


# Our names -> Marian's. Encoder layers have norm1, norm2; decoder layers norm1, norm2 (after cross-attention), norm3.
_MARIAN = [
    (r"embed\.tok\.", "embed_tokens."),
    (r"ffn\.fc", "fc"),
    (r"cross_attn\.", "encoder_attn."),
    (r"norm1\.", "self_attn_layer_norm."),
]
_MARIAN_ENCODER = [(r"norm2\.", "final_layer_norm.")]
_MARIAN_DECODER = [(r"norm2\.", "encoder_attn_layer_norm."), (r"norm3\.", "final_layer_norm.")]


DRAWS = torch.Generator().manual_seed(0)  # goes on from one call to the next: each layer of a loop its own draws;
# conftest reseeds it before every test


@torch.no_grad()
def distinct_layer_norms(model: nn.Module, gen: torch.Generator = DRAWS) -> nn.Module:
    """Every LayerNorm's weight drawn from N(1, 0.2) and bias from N(0, 0.2), each its own: as built (1 and 0), all
    LayerNorms compute the same, and a model that used one in another's place would still match its reference."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    return model


@torch.no_grad()
def distinct_biases(model: nn.Module, gen: torch.Generator = DRAWS) -> nn.Module:
    """Every bias but a LayerNorm's drawn from N(0, 0.2): GPT-2's init makes them all 0, and a model that left one out
    would still match its reference."""
    for m in model.modules():
        if not isinstance(m, nn.LayerNorm) and isinstance(getattr(m, "bias", None), nn.Parameter):
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
    return model


def marian_state(module: nn.Module, decoder: bool) -> dict:
    """Our state dict under Marian's parameter names, our LayerNorms made distinct first (distinct_layer_norms)."""
    distinct_layer_norms(module)
    rules = _MARIAN + (_MARIAN_DECODER if decoder else _MARIAN_ENCODER)
    out = {}
    for key, value in module.state_dict().items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def marian_positions(table: torch.Tensor) -> torch.Tensor:
    """Our interleaved sinusoid (sin, cos, sin, cos, ...) in Marian's layout (all sines, then all cosines)."""
    return torch.cat([table[:, 0::2], table[:, 1::2]], dim=1)


def load_into_marian(ref: nn.Module, state: dict, allowed_missing: tuple[str, ...] = ()) -> None:
    """Load a renamed state dict; every Marian parameter must be covered except those named as allowed."""
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected, f"names Marian does not have: {unexpected}"
    assert all(any(a in m for a in allowed_missing) for m in missing), f"Marian parameters left unset: {missing}"


def additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """Our bool mask (True = may attend) as the float mask HF layers add to the scores (0 or -inf)."""
    return torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))


@torch.no_grad()
def load_mha_into_torch(mha: nn.Module, ref: nn.MultiheadAttention) -> None:
    """torch keeps W^Q, W^K, W^V stacked in one in_proj_weight (3 d_model, d_model)."""
    ref.in_proj_weight.copy_(torch.cat([mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight]))
    ref.in_proj_bias.copy_(torch.cat([mha.q_proj.bias, mha.k_proj.bias, mha.v_proj.bias]))
    ref.out_proj.load_state_dict(mha.out_proj.state_dict())


def load_layer_into_torch(layer: nn.Module, ref: nn.Module) -> None:
    """One of our encoder or decoder layers into nn.TransformerEncoderLayer / nn.TransformerDecoderLayer, its
    LayerNorms made distinct first (distinct_layer_norms)."""
    distinct_layer_norms(layer)
    load_mha_into_torch(layer.self_attn, ref.self_attn)
    if hasattr(layer, "cross_attn"):
        load_mha_into_torch(layer.cross_attn, ref.multihead_attn)
        ref.norm3.load_state_dict(layer.norm3.state_dict())
    ref.linear1.load_state_dict(layer.ffn.fc1.state_dict())
    ref.linear2.load_state_dict(layer.ffn.fc2.state_dict())
    ref.norm1.load_state_dict(layer.norm1.state_dict())
    ref.norm2.load_state_dict(layer.norm2.state_dict())


def torch_encoder_layer(d_model, n_heads, d_ff):
    """The paper's layer in torch: post-LN (norm_first=False), ReLU, no dropout, (batch, seq, feature)."""
    return nn.TransformerEncoderLayer(d_model, n_heads, d_ff, dropout=0.0, activation="relu", batch_first=True,
                                      norm_first=False)


def torch_decoder_layer(d_model, n_heads, d_ff):
    return nn.TransformerDecoderLayer(d_model, n_heads, d_ff, dropout=0.0, activation="relu", batch_first=True,
                                      norm_first=False)
