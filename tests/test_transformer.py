"""Step 06's lesson: the full encoder-decoder, shared embeddings, output projection, greedy decoding."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st
from transformers import MarianMTModel

from tests.refs import load_into_marian, load_layer_into_torch, marian_config, marian_state
from tests.test_block import layer_params
from tests.test_decoder_only import reading_context

ATOL = 1e-5  # fp32, small sizes: the same sums in another order (9.5e-7 measured)

SRC = torch.tensor([[5, 6, 7, 8, 9, 2], [5, 6, 2, 0, 0, 0]])  # (B=2, S=6), EOS 2, pad 0
TGT = torch.tensor([[1, 9, 8, 7, 6, 5], [1, 6, 5, 2, 0, 0]])  # (B=2, T=6), BOS 1


def small(step):
    return step.model.Transformer(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=64,
                                  dropout=0.0, pad_id=0)


def transformer_params(V, d, n_layers, d_ff):
    """One shared V x d embedding; n encoder layers (1 attention), n decoder layers (2 attentions)."""
    return V * d + n_layers * layer_params(d, d_ff, 1) + n_layers * layer_params(d, d_ff, 2)


@pytest.mark.check("parameters")
@pytest.mark.needs("Transformer")
def test_default_config_is_the_papers_base_model(step):
    with torch.device("meta"):  # shapes only, no memory
        model = step.model.Transformer()
    assert sum(p.numel() for p in model.parameters()) == transformer_params(37000, 512, 6, 2048) == 63_082_496


@pytest.mark.needs("Transformer")
def test_one_embedding_is_shared_by_source_target_and_output(step):
    model = small(step)
    assert model.decoder.embed is model.encoder.embed
    assert model.out_proj.weight is model.encoder.embed.tok.weight
    assert sum(p.numel() for p in model.parameters()) == transformer_params(50, 32, 2, 64)


@pytest.mark.check("shapes")
@pytest.mark.needs("Transformer")
@given(batch=st.integers(1, 3), s=st.integers(1, 12), t=st.integers(1, 12))
def test_logits_shape(step, batch, s, t):
    src, tgt = torch.randint(1, 50, (batch, s)), torch.randint(1, 50, (batch, t))
    assert small(step)(src, tgt).shape == (batch, t, 50)


@pytest.mark.check("reference")
@pytest.mark.needs("Transformer")
def test_transformer_matches_torch_transformer(step):
    model = small(step)
    ref = nn.Transformer(32, 4, 2, 2, 64, dropout=0.0, batch_first=True)
    ref.encoder.norm = ref.decoder.norm = nn.Identity()  # torch adds a final LayerNorm; the post-LN paper has none
    for ours, theirs in zip([*model.encoder.layers, *model.decoder.layers], [*ref.encoder.layers, *ref.decoder.layers]):
        load_layer_into_torch(ours, theirs)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    hidden = ref(model.encoder.embed(SRC), model.decoder.embed(TGT), tgt_mask=~causal,
                 src_key_padding_mask=SRC == 0, tgt_key_padding_mask=TGT == 0, memory_key_padding_mask=SRC == 0)
    torch.testing.assert_close(model(SRC, TGT), model.out_proj(hidden), atol=ATOL, rtol=0)


@pytest.mark.check("reference")
@pytest.mark.needs("Transformer")
def test_transformer_matches_marian_mt_model_logits(step):
    model = small(step)
    ref = MarianMTModel(marian_config(vocab_size=50, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=64))
    state = {f"model.encoder.{k}": v for k, v in marian_state(model.encoder, decoder=False).items()}
    state |= {f"model.decoder.{k}": v for k, v in marian_state(model.decoder, decoder=True).items()}
    state["model.shared.weight"] = state["lm_head.weight"] = model.out_proj.weight
    load_into_marian(ref, state, allowed_missing=("embed_positions", "final_logits_bias"))
    with torch.no_grad():
        ref.model.encoder.embed_positions.weight.copy_(model.encoder.embed.pe)  # our channel order
        ref.model.decoder.embed_positions.weight.copy_(model.encoder.embed.pe)
    assert (ref.final_logits_bias == 0).all()  # Marian adds a bias to the logits; zero at init
    expected = ref(input_ids=SRC, attention_mask=(SRC != 0).long(), decoder_input_ids=TGT,
                   decoder_attention_mask=(TGT != 0).long(), use_cache=False).logits
    torch.testing.assert_close(model(SRC, TGT), expected, atol=ATOL, rtol=0)


@pytest.mark.needs("Transformer")
def test_greedy_decode_picks_the_argmax_of_a_full_forward_pass_each_time(step):
    torch.manual_seed(0)
    model = reading_context(small(step).eval(), "encoder.embed.tok.weight")  # untrained, it would echo BOS
    out = model.greedy_decode(SRC, bos_id=1, eos_id=2, max_new_tokens=8)
    tgt = torch.ones(2, 1, dtype=torch.long)  # BOS
    for _ in range(8):  # the slow way: recompute everything for each new token
        tgt = torch.cat([tgt, model(SRC, tgt)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, tgt[:, 1:])  # all 8 tokens: with seed 0 no row makes EOS
    assert not torch.equal(out[0], out[1])  # each row reads its own source


@pytest.mark.needs("Transformer")
def test_greedy_decode_never_looks_at_the_sources_pads(step):
    torch.manual_seed(0)
    model = reading_context(small(step).eval(), "encoder.embed.tok.weight")
    expected = model.greedy_decode(SRC, bos_id=1, eos_id=2, max_new_tokens=8)
    encode = model.encode

    def loud_pads(src):  # the memory at the source's pads (row 1's last 3) replaced by noise 100 times its size
        memory, src_mask = encode(src)  # (B, S, d_model), (B, 1, 1, S)
        return torch.where((src == 0)[..., None], 100 * torch.randn_like(memory), memory), src_mask

    model.encode = loud_pads
    assert torch.equal(model.greedy_decode(SRC, bos_id=1, eos_id=2, max_new_tokens=8), expected)


@pytest.mark.needs("Transformer")
def test_greedy_decode_pads_rows_after_their_eos_and_stops_when_all_are_done(step):
    model = small(step).eval()
    script = {0: [7, 2, 9, 9], 1: [7, 7, 2, 9]}  # row -> the token each decoding step makes most likely

    def scripted_decode(tgt, memory, src_mask):  # (B, t) -> (B, t, vocab) logits
        logits = torch.zeros(tgt.size(0), tgt.size(1), 50)
        for row, tokens in script.items():
            logits[row, -1, tokens[tgt.size(1) - 1]] = 1.0
        return logits

    model.decode = scripted_decode
    out = model.greedy_decode(SRC, bos_id=1, eos_id=2, max_new_tokens=10)
    assert out.tolist() == [[7, 2, 0], [7, 7, 2]]  # row 0 pads after its EOS; both done after 3 tokens
