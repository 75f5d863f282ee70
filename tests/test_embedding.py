"""Step 01's lesson: token embeddings scaled by sqrt(d_model), sinusoidal positions, dropout."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.distilbert.modeling_distilbert import create_sinusoidal_embeddings
from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

from tests.refs import marian_positions

# The table is computed in float64 and stored in float32: entries lie in [-1, 1], where float32's
# rounding step is at most 6e-8, so 1e-6 leaves room for nothing but rounding.
ATOL = 1e-6


@pytest.mark.needs("sinusoidal_table")
def test_sinusoid_matches_the_closed_form(step):
    table = step.model.sinusoidal_table(100, 16)
    for pos in (0, 1, 7, 99):
        for i in range(8):
            angle = pos / 10000 ** (2 * i / 16)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=ATOL)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=ATOL)


@pytest.mark.check("reference")
@pytest.mark.needs("sinusoidal_table")
def test_sinusoid_matches_distilbert(step):
    ref = torch.empty(512, 64)
    create_sinusoidal_embeddings(512, 64, ref)  # the same interleaved layout as the paper
    torch.testing.assert_close(step.model.sinusoidal_table(512, 64), ref, atol=ATOL, rtol=0)


@pytest.mark.check("reference")
@pytest.mark.needs("sinusoidal_table")
def test_sinusoid_is_marians_table_with_the_channels_reordered(step):
    marian = MarianSinusoidalPositionalEmbedding(512, 64)
    ref = marian.create_weight()  # Marian: all 32 sines first, then all 32 cosines
    torch.testing.assert_close(marian_positions(step.model.sinusoidal_table(512, 64)), ref, atol=ATOL, rtol=0)


@pytest.mark.needs("Embedder")
def test_the_token_table_is_drawn_with_std_d_model_to_the_minus_half_so_that_scaled_it_has_unit_scale(step):
    torch.manual_seed(0)
    tok = step.model.Embedder(vocab_size=1000, d_model=64, max_len=8, dropout=0.0).tok.weight  # 64,000 draws
    # the std of n normal draws is off by about std / sqrt(2n), 0.28% here: 5 of those is a 1-in-a-million miss
    assert abs(tok.std().item() - 64**-0.5) < 5 * 64**-0.5 / math.sqrt(2 * tok.numel())


@pytest.mark.check("shapes")
@pytest.mark.needs("Embedder")
@given(batch=st.integers(1, 4), length=st.integers(1, 32))
def test_embedder_shape(step, batch, length):
    embed = step.model.Embedder(vocab_size=11, d_model=8, max_len=32, dropout=0.1)
    assert embed(torch.randint(11, (batch, length))).shape == (batch, length, 8)


@pytest.mark.needs("Embedder")
def test_embedder_scales_tokens_by_sqrt_d_model_and_adds_positions(step):
    embed = step.model.Embedder(vocab_size=11, d_model=16, max_len=32, dropout=0.1).eval()
    idx = torch.randint(11, (2, 5))
    expected = embed.tok.weight[idx] * 4.0 + step.model.sinusoidal_table(32, 16)[:5]  # sqrt(16) = 4
    # the same two float32 operations: equal as measured; at values up to ~5, ATOL is 2 rounding steps
    torch.testing.assert_close(embed(idx), expected, atol=ATOL, rtol=0)


@pytest.mark.check("parameters")
@pytest.mark.needs("Embedder")
def test_embedder_learns_only_the_token_table(step):
    embed = step.model.Embedder(vocab_size=11, d_model=16, max_len=32, dropout=0.1)
    assert sum(p.numel() for p in embed.parameters()) == 11 * 16  # the sinusoid is a fixed buffer


@pytest.mark.needs("Embedder")
def test_embedder_drops_out_only_in_training(step):
    embed = step.model.Embedder(vocab_size=11, d_model=64, max_len=32, dropout=0.5)
    idx = torch.randint(11, (2, 32))
    assert (embed.train()(idx) == 0).any()
    assert not (embed.eval()(idx) == 0).any()


@pytest.mark.needs("Embedder")
def test_embedder_drops_the_sum_of_token_and_position_not_the_token_alone(step):
    embed = step.model.Embedder(vocab_size=11, d_model=64, max_len=32, dropout=0.5)
    idx = torch.randint(11, (2, 32))
    full, dropped = embed.eval()(idx), embed.train()(idx)
    kept = dropped != 0  # a dropped token with its position added after would be the position alone, not 0
    assert 0.4 < kept.float().mean() < 0.6  # half of 4,096, give or take 0.1: about 12 standard deviations
    assert torch.equal(dropped[kept], full[kept] * 2)  # scaled by 1 / (1 - p) = 2: exact in float32
