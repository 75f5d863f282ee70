"""Step 03's lesson: the position-wise feed-forward net, residuals and post-LayerNorm: one full block."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.marian.modeling_marian import MarianEncoderLayer

from tests.refs import additive_mask, load_into_marian, load_layer_into_torch, marian_config, marian_state, \
    torch_encoder_layer

ATOL = 1e-5  # fp32; the references add the same products in another order (see test_attention.py): 7e-7 measured


def layer_params(d, d_ff, n_attn):
    """n_attn attention sub-layers (4 (d^2 + d) each), one FFN, one LayerNorm (2 d) per sub-layer."""
    return n_attn * 4 * (d * d + d) + (2 * d * d_ff + d_ff + d) + (n_attn + 1) * 2 * d


@pytest.mark.needs("FeedForward")
def test_feed_forward_is_one_mlp_applied_at_every_position(step):
    ffn = step.model.FeedForward(d_model=16, d_ff=32)
    x = torch.randn(2, 7, 16)
    one_at_a_time = torch.cat([ffn(x[:, t : t + 1]) for t in range(7)], dim=1)
    torch.testing.assert_close(ffn(x), one_at_a_time, atol=ATOL, rtol=0)
    assert ffn.fc1.weight.shape == (32, 16)  # no position axis: one weight matrix for all positions


@pytest.mark.check("parameters")
@pytest.mark.needs("FeedForward")
def test_feed_forward_parameter_count(step):
    assert sum(p.numel() for p in step.model.FeedForward(16, 64).parameters()) == 2 * 16 * 64 + 64 + 16


@pytest.mark.check("shapes")
@pytest.mark.needs("EncoderLayer")
@given(batch=st.integers(1, 4), length=st.integers(1, 16))
def test_encoder_layer_keeps_the_shape(step, batch, length):
    layer = step.model.EncoderLayer(d_model=16, n_heads=4, d_ff=32, dropout=0.1)
    assert layer(torch.randn(batch, length, 16)).shape == (batch, length, 16)


@pytest.mark.check("reference")
@pytest.mark.needs("EncoderLayer", "padding_mask")
def test_encoder_layer_matches_torch_transformer_encoder_layer(step):
    layer = step.model.EncoderLayer(d_model=32, n_heads=4, d_ff=64, dropout=0.0)
    ref = torch_encoder_layer(32, 4, 64)
    load_layer_into_torch(layer, ref)
    idx = torch.tensor([[3, 4, 5, 6], [3, 4, 0, 0]])
    x = torch.randn(2, 4, 32)
    ours = layer(x, step.model.padding_mask(idx, 0))
    expected = ref(x, src_key_padding_mask=idx == 0)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)  # every position, the pads' too (training mode:
    # torch's fast path, which zeroes them, never runs here)


@torch.no_grad()
def shrunk_norms(*layers):
    """Each layer's LayerNorms but the last scaled by 0.1 (weight and bias): the next one then sees inputs of std ~0.1
    too, and the last passes a change made in any of them on at full size."""
    for layer in layers:
        norms = [m for m in layer.modules() if isinstance(m, torch.nn.LayerNorm)]  # in the order of the sub-layers
        for norm in norms[:-1]:
            norm.weight.mul_(0.1)
            norm.bias.mul_(0.1)


@pytest.mark.needs("EncoderLayer")
def test_encoder_layer_normalises_with_the_references_eps(step):
    # LayerNorm divides by sqrt(var + eps), torch's and Marian's eps 1e-5. On the N(0, 1) inputs above an eps of 1e-6
    # moves the outputs by 1.5e-5 at most, near ATOL (in norm1 alone, less); with inputs of std 0.1 at every LayerNorm
    # by 3.6e-4 or more, in either of them (measured, steps 03-06; 4.8e-7 with 1e-5)
    layer = step.model.EncoderLayer(d_model=32, n_heads=4, d_ff=64, dropout=0.0)
    ref = torch_encoder_layer(32, 4, 64)
    load_layer_into_torch(layer, ref)
    shrunk_norms(layer, ref)
    x = 0.1 * torch.randn(2, 4, 32)
    torch.testing.assert_close(layer(x), ref(x), atol=ATOL, rtol=0)


@pytest.mark.check("reference")
@pytest.mark.needs("EncoderLayer", "padding_mask")
def test_encoder_layer_matches_marian_encoder_layer(step):
    layer = step.model.EncoderLayer(d_model=32, n_heads=4, d_ff=64, dropout=0.0)
    ref = MarianEncoderLayer(marian_config(d_model=32, n_heads=4, d_ff=64))
    load_into_marian(ref, marian_state(layer, decoder=False))
    idx = torch.tensor([[3, 4, 5, 6], [3, 4, 0, 0]])
    x = torch.randn(2, 4, 32)
    mask = step.model.padding_mask(idx, 0)
    torch.testing.assert_close(layer(x, mask), ref(x, additive_mask(mask)), atol=ATOL, rtol=0)


@pytest.mark.check("parameters")
@pytest.mark.needs("EncoderLayer")
def test_encoder_layer_parameter_count(step):
    layer = step.model.EncoderLayer(d_model=32, n_heads=4, d_ff=64, dropout=0.1)
    assert sum(p.numel() for p in layer.parameters()) == layer_params(32, 64, n_attn=1)


class PlusOne(torch.nn.Module):
    """A stand-in sub-layer: its input plus 1 (an attention's first argument, the query)."""
    def forward(self, x, *rest):
        return x + 1


@pytest.mark.needs("EncoderLayer")
def test_dropout_drops_each_sub_layers_output_before_it_is_added(step):
    # the paper: "apply dropout to the output of each sub-layer, before it is added to the sub-layer input and
    # normalized". Sub-layers that add 1 tell that apart from dropout on their input (the 1 would stay), on the sum
    # (x dropped too) or none; torch's generator, seeded alike, drops the same positions in the layer and here
    layer = step.model.EncoderLayer(d_model=32, n_heads=4, d_ff=64, dropout=0.5).train()
    layer.self_attn, layer.ffn = PlusOne(), PlusOne()
    x = torch.randn(2, 5, 32)
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)
    h = layer.norm1(x + torch.nn.functional.dropout(x + 1, 0.5))
    torch.testing.assert_close(out, layer.norm2(h + torch.nn.functional.dropout(h + 1, 0.5)), atol=0, rtol=0)


@pytest.mark.needs("EncoderLayer")
def test_encoder_layer_is_post_layer_norm(step):
    """Add & Norm: the output is a LayerNorm's, so every position has mean 0 and variance 1 (at init)."""
    out = step.model.EncoderLayer(d_model=32, n_heads=4, d_ff=64, dropout=0.0)(torch.randn(2, 5, 32) * 10)
    # The mean of 32 outputs of size ~1 is 0 but for rounding: 4.5e-8 measured; 1e-6 is some 8 rounding steps at 1.
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-6, rtol=0)
    # var / (var + eps): LayerNorm's eps 1e-5 against a variance of order 1 leaves it within 1e-4 of 1 (1.2e-5
    # measured).
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, 5), atol=1e-4, rtol=0)
