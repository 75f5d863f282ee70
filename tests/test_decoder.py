"""Step 05's lesson: the decoder layer (masked self-attention, cross-attention, FFN) and the causal mask."""
import argparse

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.marian.modeling_marian import MarianDecoder

from tests.refs import load_into_marian, load_layer_into_torch, marian_config, marian_state, \
    torch_decoder_layer
from tests.test_block import PlusOne, layer_params, shrunk_norms
from tests.test_steps import Bigram

ATOL = 1e-5  # fp32, d_model 32: the same sums in another order (1.2e-6 measured through two layers)

TGT = torch.tensor([[1, 5, 6, 7, 8], [1, 5, 6, 0, 0]])  # (B=2, T=5), pad id 0
SRC = torch.tensor([[5, 6, 7, 8, 9, 10], [5, 6, 7, 0, 0, 0]])  # (B=2, S=6)


def small_decoder(step):
    return step.model.Decoder(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=64, dropout=0.0)


def masks(step):
    tgt_mask = step.model.padding_mask(TGT, 0) & step.model.causal_mask(TGT.size(1))  # (B, 1, T, T)
    return tgt_mask, step.model.padding_mask(SRC, 0)  # (B, 1, 1, S)


@pytest.mark.check("shapes")
@pytest.mark.needs("Decoder", "causal_mask")
@given(batch=st.integers(1, 4), t=st.integers(1, 12), s=st.integers(1, 12))
def test_decoder_shape_follows_the_target_not_the_memory(step, batch, t, s):
    tgt, memory = torch.randint(50, (batch, t)), torch.randn(batch, s, 32)
    memory_mask = torch.ones(batch, 1, 1, s, dtype=torch.bool)
    assert small_decoder(step)(tgt, memory, step.model.causal_mask(t), memory_mask).shape == (batch, t, 32)


@pytest.mark.check("reference")
@pytest.mark.needs("DecoderLayer", "padding_mask", "causal_mask")
def test_decoder_layer_matches_torch_transformer_decoder_layer(step):
    layer = step.model.DecoderLayer(d_model=32, n_heads=4, d_ff=64, dropout=0.0)
    ref = torch_decoder_layer(32, 4, 64)
    load_layer_into_torch(layer, ref)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 6, 32)
    expected = ref(x, memory, tgt_mask=~step.model.causal_mask(5)[0, 0], tgt_key_padding_mask=TGT == 0,
                   memory_key_padding_mask=SRC == 0)  # torch: True = may NOT attend
    torch.testing.assert_close(layer(x, memory, *masks(step)), expected, atol=ATOL, rtol=0)


@pytest.mark.needs("DecoderLayer")
def test_decoder_layer_normalises_with_the_references_eps(step):
    # torch's eps 1e-5 for all three LayerNorms (see test_block.py): 1e-6 in any one of them moves the outputs by
    # 1.4e-4 or more (measured, steps 05-06; 4.8e-7 with 1e-5)
    layer = step.model.DecoderLayer(d_model=32, n_heads=4, d_ff=64, dropout=0.0)
    ref = torch_decoder_layer(32, 4, 64)
    load_layer_into_torch(layer, ref)
    shrunk_norms(layer, ref)
    x, memory = 0.1 * torch.randn(2, 5, 32), 0.1 * torch.randn(2, 6, 32)
    expected = ref(x, memory, tgt_mask=~step.model.causal_mask(5)[0, 0], tgt_key_padding_mask=TGT == 0,
                   memory_key_padding_mask=SRC == 0)
    torch.testing.assert_close(layer(x, memory, *masks(step)), expected, atol=ATOL, rtol=0)


@pytest.mark.check("reference")
@pytest.mark.needs("Decoder", "padding_mask", "causal_mask")
def test_decoder_matches_torch_transformer_decoder(step):
    dec = small_decoder(step)
    ref = nn.TransformerDecoder(torch_decoder_layer(32, 4, 64), num_layers=2)
    for ours, theirs in zip(dec.layers, ref.layers):
        load_layer_into_torch(ours, theirs)
    memory = torch.randn(2, 6, 32)
    expected = ref(dec.embed(TGT), memory, tgt_mask=~step.model.causal_mask(5)[0, 0], tgt_key_padding_mask=TGT == 0,
                   memory_key_padding_mask=SRC == 0)
    torch.testing.assert_close(dec(TGT, memory, *masks(step)), expected, atol=ATOL, rtol=0)


@pytest.mark.check("reference")
@pytest.mark.needs("Decoder", "padding_mask", "causal_mask")
def test_decoder_matches_marian_decoder_with_embeddings(step):
    dec = small_decoder(step)
    ref = MarianDecoder(marian_config(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=64))
    load_into_marian(ref, marian_state(dec, decoder=True), allowed_missing=("embed_positions",))
    with torch.no_grad():
        ref.embed_positions.weight.copy_(dec.embed.pe)  # our channel order (Marian's differs, see test_embedding)
    memory = torch.randn(2, 6, 32)
    expected = ref(input_ids=TGT, attention_mask=(TGT != 0).long(), encoder_hidden_states=memory,
                   encoder_attention_mask=(SRC != 0).long(), use_cache=False).last_hidden_state
    torch.testing.assert_close(dec(TGT, memory, *masks(step)), expected, atol=ATOL, rtol=0)


@pytest.mark.needs("Decoder", "causal_mask")
@given(T=st.integers(2, 10), t=st.integers(0, 8))
def test_decoder_output_at_t_ignores_later_targets(step, T, t):
    t = min(t, T - 2)
    dec = small_decoder(step).eval()
    tgt = torch.randint(1, 50, (2, T))
    changed = tgt.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] % 49) + 1  # every later token differs, none is pad
    memory, mask = torch.randn(2, 6, 32), step.model.causal_mask(T)
    memory_mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    torch.testing.assert_close(dec(tgt, memory, mask, memory_mask)[:, : t + 1],
                               dec(changed, memory, mask, memory_mask)[:, : t + 1], atol=0, rtol=0)
    # exact: same shapes, same kernels, and a masked score's weight is exactly 0 (exp(-inf)): any difference leaks


@pytest.mark.needs("Decoder")
@pytest.mark.main_needs("loss_of")
def test_training_reads_the_target_without_its_last_token_and_scores_each_position_on_the_next(step):
    """Teacher forcing, as the step trains: the decoder reads tgt[:, :-1] (BOS first), and its output at t is scored
    against tgt[:, t + 1]. A stand-in model that puts all its weight on that next token scores 0 only so."""
    read = []

    def next_token_model(src, tgt_in):
        read.append(tgt_in)
        return 100.0 * F.one_hot(TGT[:, 1:], 50).float()  # (B, T-1, vocab 50): certain of each next token

    loss = step.main.loss_of(next_token_model, SRC, TGT)
    assert torch.equal(read[0], TGT[:, :-1])
    assert loss.item() < 1e-6  # 49 e^-100 per position; a target off by one position costs about 100


@pytest.mark.needs("DecoderLayer")
def test_dropout_drops_each_of_the_three_sub_layers_outputs_before_it_is_added(step):
    # as test_block.py's, for the decoder's three sub-layers (the cross-attention's query is x, its keys the memory)
    layer = step.model.DecoderLayer(d_model=32, n_heads=4, d_ff=64, dropout=0.5).train()
    layer.self_attn, layer.cross_attn, layer.ffn = PlusOne(), PlusOne(), PlusOne()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    torch.manual_seed(0)
    out = layer(x, memory, None, None)
    torch.manual_seed(0)
    for norm in (layer.norm1, layer.norm2, layer.norm3):
        x = norm(x + F.dropout(x + 1, 0.5))
    torch.testing.assert_close(out, x, atol=0, rtol=0)


@pytest.mark.needs("Decoder")
def test_decoder_reads_the_memory(step):
    """Cross-attention: a different memory gives a different output at every position."""
    dec = small_decoder(step).eval()
    ones = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    a = dec(TGT[:1], torch.randn(1, 6, 32), causal, ones)
    b = dec(TGT[:1], torch.randn(1, 6, 32), causal, ones)
    assert not torch.isclose(a, b).all(-1).any()


@pytest.mark.check("parameters")
@pytest.mark.needs("Decoder")
def test_decoder_parameter_count(step):
    assert sum(p.numel() for p in small_decoder(step).parameters()) == 50 * 32 + 2 * layer_params(32, 64, 2)


@pytest.mark.main_needs("FixedMemoryDecoder")
def test_the_steps_decoder_reads_no_later_target_token(step):
    """The run's own model (step 05), as it trains: its logits at t stay the same whatever comes after t."""
    model = step.main.FixedMemoryDecoder(vocab_size=20, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=16,
                                         dropout=0.0).eval()
    src, tgt = torch.randint(3, 20, (2, 6)), torch.randint(3, 20, (2, 8))  # no PAD: every position is real
    changed = tgt.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 17 + 3  # every token after t = 3 differs
    # exact: same shapes, same kernels, and a masked score's weight is exactly 0 (exp(-inf)): any difference leaks
    torch.testing.assert_close(model(src, tgt)[:, :4], model(src, changed)[:, :4], atol=0, rtol=0)


@pytest.mark.main_needs("FixedMemoryDecoder")
def test_the_steps_decoder_reads_no_source_pad_and_its_memory_stays_as_drawn(step):
    torch.manual_seed(0)
    model = step.main.FixedMemoryDecoder(vocab_size=20, d_model=16, n_heads=2, n_layers=2, d_ff=32, max_len=16,
                                         dropout=0.0).eval()
    src, tgt = torch.tensor([[5, 6, 2, 0, 0]]), torch.randint(3, 20, (1, 6))  # a word, EOS (2), then PAD (0)
    torch.testing.assert_close(model(src, tgt), model(src[:, :3], tgt), atol=1e-6, rtol=0)  # the pads: nothing
    assert not any(p.requires_grad for p in model.memory.parameters())  # frozen: a fixed, random memory


@pytest.mark.main_needs("reversal_batch")
def test_the_target_is_bos_the_source_word_reversed_and_eos(step):
    src, tgt = step.main.reversal_batch(50, 6, torch.Generator().manual_seed(0))  # (50, 7), (50, 8)
    PAD, BOS, EOS = step.main.PAD, step.main.BOS, step.main.EOS
    for s, t in zip(src.tolist(), tgt.tolist()):
        word = s[: s.index(EOS)]
        assert t == [BOS, *reversed(word), EOS] + [PAD] * (6 - len(word)) and 1 <= len(word) <= 6


class TargetBigram(Bigram):
    """The stand-in model of test_steps.py, reading the target only: (src, tgt_in) -> (B, T, vocab)."""

    def forward(self, src, tgt_in):
        return super().forward(tgt_in)


@pytest.mark.main_needs("reversal_batch", "evaluate")
def test_validation_loss_is_one_cross_entropy_over_every_target_token_but_the_padding(step):
    torch.manual_seed(0)
    model = TargetBigram(3 + 26)  # PAD, BOS, EOS and the letters
    args = argparse.Namespace(batch_size=3, max_letters=6, device="cpu")  # 10 words: batches of 3, 3, 3 and 1
    src, tgt = step.main.reversal_batch(10, 6, torch.Generator().manual_seed(0))  # evaluate's own words
    expected = F.cross_entropy(model(src, tgt[:, :-1]).flatten(0, 1), tgt[:, 1:].flatten(),
                               ignore_index=step.main.PAD).item()
    assert step.main.evaluate(model, args, words=10) == pytest.approx(expected, rel=1e-6)  # fp32, another order
