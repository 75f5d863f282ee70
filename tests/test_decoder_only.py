"""Step 07's lesson: the decoder alone as a language model over GPT-2 BPE tokens, with a padding (attention) mask."""
import argparse

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from transformers import MarianForCausalLM

from shared import data
from tests.refs import load_into_marian, load_layer_into_torch, marian_config, marian_state, torch_encoder_layer
from tests.test_block import layer_params, shrunk_norms

ATOL = 1e-5  # fp32, two layers of d_model 32: the references add the same products in another order (1.9e-6 measured)

IDX = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])  # (B=2, T=6)


def small(step):
    return step.model.DecoderOnlyLM(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=64, dropout=0.0)


def pad(rows, left=True, pad_id=0):
    """Rows of different length -> idx (B, T) and attention_mask (B, T), 0 at the padding."""
    T = max(len(r) for r in rows)
    side = lambda filler, real: [filler] * (T - len(real)) + real if left else real + [filler] * (T - len(real))
    return torch.tensor([side(pad_id, r) for r in rows]), torch.tensor([side(0, [1] * len(r)) for r in rows])


@pytest.mark.check("shapes")
@pytest.mark.needs("DecoderOnlyLM")
@given(batch=st.integers(1, 3), length=st.integers(1, 16))
def test_logits_shape(step, batch, length):
    assert small(step)(torch.randint(50, (batch, length))).shape == (batch, length, 50)


@pytest.mark.check("parameters")
@pytest.mark.needs("DecoderOnlyLM")
def test_default_config_is_the_papers_base_decoder_over_gpt2_tokens(step):
    with torch.device("meta"):  # shapes only, no memory
        model = step.model.DecoderOnlyLM()
    # One 50257 x 512 table (tied), 6 layers with one attention each: no cross-attention left.
    assert sum(p.numel() for p in model.parameters()) == 50257 * 512 + 6 * layer_params(512, 2048, 1) == 44_645_888


@pytest.mark.needs("DecoderOnlyLM")
def test_output_projection_is_the_token_embedding(step):
    model = small(step)
    assert model.out_proj.weight is model.embed.tok.weight
    assert sum(p.numel() for p in model.parameters()) == 50 * 32 + 2 * layer_params(32, 64, 1)


@pytest.mark.needs("DecoderOnlyLM")
@pytest.mark.parametrize("input_scale", ["sqrt(d_model)", "1"])
def test_untrained_tied_logits_are_of_order_1_whatever_the_input_scale(step, input_scale):
    # A logit is a table row (norm ~1: std d_model^-0.5 over d_model entries) dotted with the last LayerNorm's output
    # (entries ~1, norm ~sqrt(d_model)) in a random direction: std ~1. The multiplier on the input plays no part.
    torch.manual_seed(0)
    model = step.model.DecoderOnlyLM(vocab_size=50257, d_model=64, n_heads=4, n_layers=2, d_ff=256, dropout=0.0)
    if input_scale == "1":
        model.embed.d_model = 1  # the Embedder multiplies by sqrt(self.d_model)
    with torch.no_grad():
        logits = model(torch.randint(50257, (4, 32)))
    # 6.4M logits: their std is known to far better than 10%; 0.9..1.1 is the claim "of order 1", made precise
    # (1.001 at seed 0, both scales).
    assert 0.9 < logits.std().item() < 1.1


@pytest.mark.needs("DecoderOnlyLM")
@pytest.mark.parametrize("input_scale, low, high", [("sqrt(d_model)", 5.0, 7.5), ("1", 0.5, 2.0)])
def test_untrained_tied_logits_favour_the_input_token_itself_through_the_scaled_embedding(step, input_scale, low,
                                                                                          high):
    # One row is not in a random direction: the input token's own. The residual stream carries its embedding (x
    # sqrt(d_model): entries ~1) up to the last LayerNorm, so its logit starts near 6 here, not ~1 (1.3 at scale 1).
    torch.manual_seed(0)
    model = step.model.DecoderOnlyLM(vocab_size=50257, d_model=64, n_heads=4, n_layers=2, d_ff=256, dropout=0.0)
    if input_scale == "1":
        model.embed.d_model = 1
    idx = torch.randint(50257, (4, 32))
    with torch.no_grad():
        own = model(idx).gather(-1, idx[..., None])  # (B, T, 1): each position's logit of its own input token
    # the mean of 128 such logits: 6.1 and 1.3 at seed 0, 5.9-6.4 and 1.25-1.6 over seeds 0-7; the bounds allow that
    # spread (another torch may draw other numbers), and keep the two cases apart by 3 or more
    assert low < own.mean().item() < high


@pytest.mark.check("reference")
@pytest.mark.needs("DecoderOnlyLM")
def test_matches_marian_for_causal_lm_logits(step):
    """Marian's decoder without an encoder: its cross-attention weights exist but are never used."""
    model = small(step)
    ref = MarianForCausalLM(marian_config(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=64))
    state = {f"model.decoder.{k}": v for k, v in marian_state(model, decoder=False).items() if k != "out_proj.weight"}
    state["lm_head.weight"] = model.out_proj.weight
    load_into_marian(ref, state, allowed_missing=("embed_positions", "encoder_attn"))
    with torch.no_grad():
        ref.model.decoder.embed_positions.weight.copy_(model.embed.pe)  # our channel order (see test_embedding)
    expected = ref(input_ids=IDX, use_cache=False).logits
    torch.testing.assert_close(model(IDX), expected, atol=ATOL, rtol=0)


@pytest.mark.check("reference")
@pytest.mark.needs("DecoderOnlyLM")
def test_matches_torch_transformer_encoder_with_a_causal_mask(step):
    """Without cross-attention, a decoder layer is an encoder layer that may not look ahead."""
    model = small(step)
    ref = nn.TransformerEncoder(torch_encoder_layer(32, 4, 64), num_layers=2, enable_nested_tensor=False)
    for ours, theirs in zip(model.layers, ref.layers):
        load_layer_into_torch(ours, theirs)
    T = IDX.size(1)
    hidden = ref(model.embed(IDX), mask=nn.Transformer.generate_square_subsequent_mask(T), is_causal=True)
    torch.testing.assert_close(model(IDX), model.out_proj(hidden), atol=ATOL, rtol=0)


@pytest.mark.needs("DecoderOnlyLayer", "causal_mask")
def test_a_layer_normalises_with_the_references_eps(step):
    # torch's eps 1e-5 for both LayerNorms (see test_block.py): 1e-6 in either moves the outputs by 4.1e-4 or more
    layer = step.model.DecoderOnlyLayer(d_model=32, n_heads=4, d_ff=64, dropout=0.0)
    ref = torch_encoder_layer(32, 4, 64)
    load_layer_into_torch(layer, ref)
    shrunk_norms(layer, ref)
    x = 0.1 * torch.randn(2, 6, 32)
    expected = ref(x, src_mask=nn.Transformer.generate_square_subsequent_mask(6), is_causal=True)
    torch.testing.assert_close(layer(x, step.model.causal_mask(6)), expected, atol=ATOL, rtol=0)


@pytest.mark.needs("DecoderOnlyLM")
@given(T=st.integers(2, 12), t=st.integers(0, 10))
def test_logits_at_t_ignore_later_tokens(step, T, t):
    t = min(t, T - 2)
    model = small(step).eval()
    idx = torch.randint(50, (2, T))
    changed = idx.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1) % 50  # every later token differs
    torch.testing.assert_close(model(idx)[:, : t + 1], model(changed)[:, : t + 1], atol=0, rtol=0)
    # exact: same shapes, same kernels, and a masked score's weight is exactly 0 (exp(-inf)): any difference leaks


@pytest.mark.needs("DecoderOnlyLM")
@given(lengths=st.lists(st.integers(1, 10), min_size=2, max_size=4), left=st.booleans())
def test_padding_does_not_change_the_logits_of_real_tokens(step, lengths, left):
    """A batch of prompts of different length, padded on either side, against each prompt alone."""
    model = small(step).eval()
    rows = [torch.randint(1, 50, (n,)).tolist() for n in lengths]
    idx, mask = pad(rows, left)
    logits = model(idx, mask)  # (B, T, vocab_size)
    assert torch.isfinite(logits).all()  # a pad that sees only pads must not turn into nan and spread
    for b, row in enumerate(rows):
        real = mask[b].bool()
        torch.testing.assert_close(logits[b, real], model(torch.tensor([row]))[0], atol=ATOL, rtol=0)


@pytest.mark.needs("padded_causal_mask")
def test_padded_causal_mask_hides_pads_and_the_future(step):
    mask = step.model.padded_causal_mask(torch.tensor([[0, 0, 1, 1]]))  # two pads on the left
    expected = torch.tensor([[1, 0, 0, 0],  # a pad sees itself only, so its softmax row is never empty
                             [0, 1, 0, 0],
                             [0, 0, 1, 0],  # real tokens see real tokens up to themselves
                             [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0, 0], expected)


@pytest.mark.needs("DecoderOnlyLM")
def test_generate_keeps_the_prompt_and_appends_max_new_tokens(step):
    model = small(step).eval()
    out = model.generate(IDX, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 11) and torch.equal(out[:, :6], IDX)
    assert ((0 <= out) & (out < 50)).all()


def read_by(model) -> list:
    """What each forward pass of model is given from now on: its first argument, the token ids."""
    seen, forward = [], model.forward
    model.forward = lambda idx, *args, **kwargs: seen.append(idx.clone()) or forward(idx, *args, **kwargs)
    return seen


@pytest.mark.needs("DecoderOnlyLM")
def test_generate_reads_exactly_the_last_max_len_tokens(step):
    model = step.model.DecoderOnlyLM(50, 32, 4, 2, 64, max_len=8, dropout=0.0).eval()
    seen = read_by(model)
    out = model.generate(torch.randint(50, (1, 8)), max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 12)  # no position past the sinusoid table of 8 rows was asked for
    assert [s.tolist() for s in seen] == [out[:, i : i + 8].tolist() for i in range(4)]  # the last 8, not 7


@pytest.mark.needs("DecoderOnlyLM")
def test_generate_at_temperature_1_samples_not_only_the_most_likely_token(step):
    model = small(step).eval()  # untrained: logits of order 1 over 50 tokens, no one token near certain
    out = model.generate(IDX[:1].repeat(64, 1), max_new_tokens=1, generator=torch.Generator().manual_seed(0))
    assert len(set(out[:, -1].tolist())) > 5  # 64 draws of one distribution


def argmax_loop(model, idx, n: int):
    """Greedy decoding the slow way: a whole forward pass for each new token, no mask. -> (B, T + n)."""
    for _ in range(n):
        out = model(idx)
        logits = (out[0] if isinstance(out, tuple) else out)[:, -1]  # (B, vocab); GPT returns (logits, loss)
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
    return idx


@torch.no_grad()
def reading_context(model, table: str):
    """Every matrix but the tied token table redrawn from N(0, 0.3): untrained, the table makes each token predict
    itself, and greedy decoding would echo the last token without reading the context."""
    for name, w in model.named_parameters():
        if w.dim() == 2 and name != table:
            w.normal_(0, 0.3)
    return model


@pytest.mark.needs("DecoderOnlyLM")
def test_generate_at_a_temperature_near_0_is_the_argmax_of_a_whole_forward_pass_each_time(step):
    # At 1e-4, a gap g between the two largest logits leaves the second e^(-g / 1e-4) of the first's weight: with
    # seed 0, g is at least 0.043, e^-430.
    torch.manual_seed(0)
    model = reading_context(small(step).eval(), "embed.tok.weight")
    out = model.generate(IDX, max_new_tokens=8, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    greedy = argmax_loop(model, IDX, 8)
    assert torch.equal(out, greedy) and not (greedy[:, 6:] == IDX[:, -1:]).all()  # not the last token echoed


@pytest.mark.main_needs("pad_left")
def test_the_runs_prompts_are_padded_on_the_left_with_a_mask_of_their_real_tokens(step):
    idx, mask = step.main.pad_left([[7], [2, 3, 4]], 0)
    assert idx.tolist() == [[0, 0, 7], [2, 3, 4]] and mask.tolist() == [[0, 0, 1], [1, 1, 1]]


class GenerateRecorder(nn.Module):
    """Stands in for the run's model: keeps what show_samples hands to generate, and writes '..' after each prompt."""

    def generate(self, idx, max_new_tokens, attention_mask=None, generator=None):
        self.seen = {"training": self.training, "idx": idx, "attention_mask": attention_mask}
        return torch.cat([idx, torch.full((idx.size(0), max_new_tokens), 13)], dim=1)  # (B, T + new): 13 is '.'


def show_samples(step, capsys):
    """The run's samples, written by the recorder (in training mode, as the loop leaves a model): (recorder, text)."""
    model = GenerateRecorder().train()
    step.main.show_samples(model, data.gpt2_tokenizer(), argparse.Namespace(device="cpu", seed=0, max_new_tokens=2))
    return model, capsys.readouterr().out


@pytest.mark.main_needs("show_samples")
def test_the_runs_samples_are_drawn_in_eval_mode(step, capsys):
    model, _ = show_samples(step, capsys)
    assert model.seen["training"] is False  # dropout off while writing


@pytest.mark.main_needs("show_samples")
def test_the_runs_samples_are_drawn_with_a_mask_of_each_prompts_own_tokens(step, capsys):
    model, _ = show_samples(step, capsys)
    prompts = [data.gpt2_tokenizer().encode(p) for p in step.main.PROMPTS]
    idx, mask = model.seen["idx"], model.seen["attention_mask"]  # (B, T) each
    for i, ids in enumerate(prompts):
        assert mask[i].tolist() == [0] * (idx.size(1) - len(ids)) + [1] * len(ids), f"prompt {i}"
        assert idx[i, idx.size(1) - len(ids):].tolist() == ids, f"prompt {i}"


@pytest.mark.main_needs("show_samples")
def test_the_runs_samples_are_printed_without_their_padding(step, capsys):
    _, out = show_samples(step, capsys)
    samples = [s.strip("\n") for s in out.split("-" * 60 + "\n")[1:]]
    assert samples == [p + ".." for p in step.main.PROMPTS]  # no <|endoftext|> pads before a prompt
