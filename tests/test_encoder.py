"""Step 04's lesson: the encoder, N stacked layers over a padded batch with a source padding mask."""
import argparse

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.marian.modeling_marian import MarianEncoder

from shared import data
from tests.refs import load_into_marian, load_layer_into_torch, marian_config, marian_state, \
    torch_encoder_layer
from tests.test_block import layer_params
from tests.test_steps import Bigram

ATOL = 1e-5  # fp32, two layers of d_model 32: the same sums in another order (7e-7 measured)


def small_encoder(step):
    return step.model.Encoder(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=64, dropout=0.0)


SRC = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 0, 0, 0]])  # (B=2, S=6), pad id 0


@pytest.mark.check("shapes")
@pytest.mark.needs("Encoder", "padding_mask")
@given(batch=st.integers(1, 4), length=st.integers(1, 16))
def test_encoder_shape(step, batch, length):
    src = torch.randint(50, (batch, length))
    assert small_encoder(step)(src, step.model.padding_mask(src, 0)).shape == (batch, length, 32)


@pytest.mark.check("reference")
@pytest.mark.needs("Encoder", "padding_mask")
def test_encoder_matches_torch_transformer_encoder(step):
    enc = small_encoder(step)
    ref = nn.TransformerEncoder(torch_encoder_layer(32, 4, 64), num_layers=2, enable_nested_tensor=False)
    for ours, theirs in zip(enc.layers, ref.layers):
        load_layer_into_torch(ours, theirs)
    expected = ref(enc.embed(SRC), src_key_padding_mask=SRC == 0)  # torch.nn has no embedding: feed ours
    ours = enc(SRC, step.model.padding_mask(SRC, 0))
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)  # the pads' positions too: no fast path, no nesting


@pytest.mark.check("reference")
@pytest.mark.needs("Encoder", "padding_mask")
def test_encoder_matches_marian_encoder_with_embeddings(step):
    enc = small_encoder(step)
    ref = MarianEncoder(marian_config(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=64))
    load_into_marian(ref, marian_state(enc, decoder=False), allowed_missing=("embed_positions",))
    with torch.no_grad():
        ref.embed_positions.weight.copy_(enc.embed.pe)  # our channel order (Marian's differs, see test_embedding)
    expected = ref(input_ids=SRC, attention_mask=(SRC != 0).long()).last_hidden_state
    torch.testing.assert_close(enc(SRC, step.model.padding_mask(SRC, 0)), expected, atol=ATOL, rtol=0)


@pytest.mark.needs("Encoder", "padding_mask")
def test_padding_does_not_change_the_real_positions(step):
    enc = small_encoder(step).eval()
    alone = torch.tensor([[5, 6, 7]])
    padded = torch.tensor([[5, 6, 7, 0, 0, 0, 0]])
    out_alone = enc(alone, step.model.padding_mask(alone, 0))
    out_padded = enc(padded, step.model.padding_mask(padded, 0))
    torch.testing.assert_close(out_padded[:, :3], out_alone, atol=ATOL, rtol=0)


@pytest.mark.needs("Encoder")
def test_encoder_sees_both_directions(step):
    """No causal mask: changing the last token changes the output at the first position."""
    enc = small_encoder(step).eval()
    a, b = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 7, 9]])
    mask = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    assert not torch.allclose(enc(a, mask)[:, 0], enc(b, mask)[:, 0], atol=ATOL)


@pytest.mark.check("parameters")
@pytest.mark.needs("Encoder")
def test_encoder_parameter_count(step):
    assert sum(p.numel() for p in small_encoder(step).parameters()) == 50 * 32 + 2 * layer_params(32, 64, 1)


@pytest.mark.main_needs("hide")
def test_every_batch_hides_at_least_one_character_so_that_its_loss_is_a_number(step):
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):  # one window of 4: at 15% each, nothing would be hidden about 6 times in 10
        x, y = step.main.hide(torch.randint(2, 60, (1, 4)), gen)
        assert (y >= 0).sum() >= 1
        assert torch.equal(x == step.main.MASK, y >= 0)  # and each hidden character is a MASK in x


@pytest.mark.main_needs("hide")
def test_a_batch_is_cut_to_random_lengths_and_15_percent_of_its_real_characters_are_hidden(step):
    x = torch.randint(2, 60, (400, 32))  # 0 and 1 are PAD and MASK
    hidden, y = step.main.hide(x, torch.Generator().manual_seed(0))
    pad = hidden == step.main.PAD
    lengths = (~pad).sum(1)  # each row: real characters first, then PAD to the end
    assert torch.equal(pad, torch.arange(32) >= lengths[:, None])
    assert lengths.min() >= 16 and len(set(lengths.tolist())) > 10  # from S // 2 to S, drawn a row
    masked = (hidden == step.main.MASK).sum().item() / (~pad).sum().item()
    # about 9,600 real characters: the fraction's sd is 0.0036, and 0.01 is 2.7 of them (the draws are seeded: the
    # same every run)
    assert abs(masked - 0.15) < 0.01
    assert torch.equal(hidden[~pad & (y < 0)], x[~pad & (y < 0)])  # the others kept as they were


@pytest.mark.main_needs("MaskedCharLM")
def test_the_masked_lm_hides_the_pads_from_every_position_and_nothing_else(step):
    torch.manual_seed(0)
    model = step.main.MaskedCharLM(60, 32, 4, 2, 64, max_len=8, dropout=0.0).eval()
    x = torch.tensor([[5, 1, 7, 0, 0], [5, 1, 7, 9, 1]])  # MASK (1) is a character to read; PAD (0) is not
    short = model(x[:1, :3])  # the same row without its pads
    torch.testing.assert_close(model(x)[0, :3], short[0], atol=1e-6, rtol=0)  # the pads change nothing real
    assert not torch.allclose(model(x)[1, :3], short[0], atol=1e-3)  # but a 4th character does


@pytest.mark.main_needs("hide", "evaluate")
def test_validation_loss_is_one_cross_entropy_over_every_hidden_character(step):
    torch.manual_seed(0)
    model, ids = Bigram(20), torch.randint(2, 20, (30,))  # 0 and 1 are PAD and MASK
    args = argparse.Namespace(batch_size=3, block_size=4, device="cpu")  # 7 windows: batches of 3, 3 and 1
    gen = torch.Generator().manual_seed(0)  # evaluate's own: the same characters hidden in the same order
    hidden = [step.main.hide(x, gen) for x, _ in data.sequential_windows(ids, 3, 4)]
    x, y = (torch.cat(t) for t in zip(*hidden))  # (7, 4) each
    expected = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100).item()  # over y >= 0 only
    assert step.main.evaluate(model, ids, args) == pytest.approx(expected, rel=1e-6)  # fp32 sums in another order
