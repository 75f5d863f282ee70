"""Step 02's lesson: scaled dot-product attention, multi-head attention, padding and causal masks."""
import einops
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from transformers.models.marian.modeling_marian import MarianAttention

from tests.refs import additive_mask, load_mha_into_torch, marian_config
from tests.test_steps import kwargs_it_takes

# fp32, d_model 32: the references sum the same products in another order; 1e-5 is about 80 float32 rounding
# steps (1.2e-7) at the size of these outputs (|x| ~ 1). Measured on this CPU: 3.6e-7 at most.
ATOL = 1e-5


def qkv(batch, heads, t, s, d=8):
    return torch.randn(batch, heads, t, d), torch.randn(batch, heads, s, d), torch.randn(batch, heads, s, d)


@pytest.mark.needs("attention")
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), t=st.integers(1, 12), s=st.integers(1, 12))
def test_attention_rows_sum_to_one(step, batch, heads, t, s):
    out, weights = step.model.attention(*qkv(batch, heads, t, s))
    assert out.shape == (batch, heads, t, 8) and weights.shape == (batch, heads, t, s)
    torch.testing.assert_close(weights.sum(-1), torch.ones(batch, heads, t), atol=ATOL, rtol=0)


@pytest.mark.needs("attention", "padding_mask")
@given(lengths=st.lists(st.integers(1, 10), min_size=1, max_size=4))
def test_padding_keys_get_zero_weight(step, lengths):
    S = max(lengths) + 1  # every row ends in one pad or more: there is always a padding key to check
    idx = torch.tensor([[5] * n + [0] * (S - n) for n in lengths])  # (B, S), pad id 0 after each row
    mask = step.model.padding_mask(idx, pad_id=0)  # (B, 1, 1, S)
    _, weights = step.model.attention(*qkv(len(lengths), 2, 6, S), mask=mask)
    assert (weights.masked_select(idx[:, None, None, :] == 0) == 0).all()


@pytest.mark.needs("attention", "causal_mask")
@given(T=st.integers(1, 12))
def test_causal_mask_gives_no_weight_to_the_future(step, T):
    _, weights = step.model.attention(*qkv(2, 2, T, T), mask=step.model.causal_mask(T))
    future = weights.triu(diagonal=1)  # (B, H, T, T): query t's weights on keys after t
    assert (future == 0).all(), f"a position gives weight up to {future.max():.3f} to a later one"


@pytest.mark.needs("MultiHeadAttention", "causal_mask")
@given(T=st.integers(2, 12), t=st.integers(0, 10))
def test_causal_output_at_t_ignores_later_inputs(step, T, t):
    t = min(t, T - 2)
    mha = step.model.MultiHeadAttention(d_model=16, n_heads=4)
    x = torch.randn(2, T, 16)
    changed = x.clone()
    changed[:, t + 1 :] = torch.randn(2, T - t - 1, 16)  # only positions after t differ
    mask = step.model.causal_mask(T)
    # exact: same shapes, same kernels, and a masked score's weight is exactly 0 (exp(-inf)): any difference leaks
    torch.testing.assert_close(mha(x, x, x, mask)[:, : t + 1], mha(changed, changed, changed, mask)[:, : t + 1],
                               atol=0, rtol=0)


@pytest.mark.check("reference")
@pytest.mark.needs("attention", "causal_mask")
def test_attention_matches_torch_scaled_dot_product_attention(step):
    q, k, v = qkv(2, 4, 7, 7)
    mask = step.model.causal_mask(7)  # torch's bool mask has the same meaning: True = may attend
    out, _ = step.model.attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=ATOL, rtol=0)


def _padded_batch():
    idx = torch.tensor([[3, 4, 5, 6, 7], [3, 4, 5, 0, 0]])  # (B=2, S=5), second row padded
    return idx, torch.randn(2, 5, 32)


@pytest.mark.check("reference")
@pytest.mark.needs("MultiHeadAttention", "padding_mask", "causal_mask")
def test_multi_head_attention_matches_torch_multihead_attention(step):
    mha = step.model.MultiHeadAttention(d_model=32, n_heads=4)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    load_mha_into_torch(mha, ref)
    idx, x = _padded_batch()
    mask = step.model.padding_mask(idx, 0) & step.model.causal_mask(5)  # (B, 1, S, S)
    # torch's masks mean the opposite: True = may NOT attend.
    expected, _ = ref(x, x, x, attn_mask=~step.model.causal_mask(5)[0, 0], key_padding_mask=idx == 0)
    torch.testing.assert_close(mha(x, x, x, mask), expected, atol=ATOL, rtol=0)


@pytest.mark.check("reference")
@pytest.mark.needs("MultiHeadAttention", "padding_mask")
def test_multi_head_attention_takes_its_keys_and_its_values_from_its_own_arguments(step):
    # every call in the steps passes key = value (self-attention, or the memory twice): distinct ones tell k_proj(key)
    # from k_proj(value)
    mha = step.model.MultiHeadAttention(d_model=32, n_heads=4)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    load_mha_into_torch(mha, ref)
    idx, q = _padded_batch()
    k, v = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    expected, _ = ref(q, k, v, key_padding_mask=idx == 0)
    torch.testing.assert_close(mha(q, k, v, step.model.padding_mask(idx, 0)), expected, atol=ATOL, rtol=0)


@pytest.mark.check("reference")
@pytest.mark.needs("MultiHeadAttention", "padding_mask")
def test_multi_head_attention_matches_marian_attention(step):
    mha = step.model.MultiHeadAttention(d_model=32, n_heads=4)
    ref = MarianAttention(32, 4, config=marian_config(d_model=32, n_heads=4))
    ref.load_state_dict(mha.state_dict())  # same names: q_proj, k_proj, v_proj, out_proj
    idx, x = _padded_batch()
    mask = step.model.padding_mask(idx, 0)
    expected, _ = ref(x, attention_mask=additive_mask(mask))
    torch.testing.assert_close(mha(x, x, x, mask), expected, atol=ATOL, rtol=0)


@pytest.mark.check("parameters")
@pytest.mark.needs("MultiHeadAttention")
def test_multi_head_attention_parameter_count(step):
    d = 32
    assert sum(p.numel() for p in step.model.MultiHeadAttention(d, 4).parameters()) == 4 * (d * d + d)


@pytest.mark.needs("MultiHeadAttention")
def test_reassembling_heads_wrongly_is_caught_by_the_reference(step, monkeypatch):
    """The classic mistake: merge heads as (d h) instead of (h d). Shapes still fit; only a reference sees it."""
    def wrong_rearrange(tensor, pattern, **kw):
        if pattern == "b h t d -> b t (h d)":
            pattern = "b h t d -> b t (d h)"
        return einops.rearrange(tensor, pattern, **kw)

    mha = step.model.MultiHeadAttention(d_model=32, n_heads=4)
    ref = nn.MultiheadAttention(32, 4, batch_first=True)
    load_mha_into_torch(mha, ref)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mha(x, x, x), ref(x, x, x)[0], atol=ATOL, rtol=0)
    monkeypatch.setattr(step.model, "rearrange", wrong_rearrange)
    wrong = mha(x, x, x)
    assert wrong.shape == (2, 5, 32)
    assert not torch.allclose(wrong, ref(x, x, x)[0], atol=ATOL)


def merged_as(merge):
    """einops.rearrange, with the heads' merge ("b h t d -> b t (...)", right or wrong) done by merge(tensor)."""
    def rearrange(tensor, pattern, **kw):
        return merge(tensor) if pattern.startswith("b h t d -> b t (") else einops.rearrange(tensor, pattern, **kw)
    return rearrange


@pytest.mark.needs("MultiHeadAttention")
def test_merging_heads_as_d_h_is_the_right_merge_with_out_proj_inputs_permuted(step, monkeypatch):
    """(d h) instead of (h d) lists the same numbers in another order: out_proj with its columns permuted undoes it.
    From scratch it trains as well; what breaks is every reference and every pretrained weight."""
    H, D = 4, 8
    mha = step.model.MultiHeadAttention(d_model=H * D, n_heads=H)
    x = torch.randn(2, 5, H * D)
    monkeypatch.setattr(step.model, "rearrange", merged_as(lambda t: einops.rearrange(t, "b h t d -> b t (h d)")))
    right = mha(x, x, x)
    monkeypatch.setattr(step.model, "rearrange", merged_as(lambda t: einops.rearrange(t, "b h t d -> b t (d h)")))
    assert not torch.allclose(mha(x, x, x), right, atol=ATOL)
    with torch.no_grad():  # channel d*H + h of the wrong merge is channel h*D + d of the right one
        mha.out_proj.weight.copy_(mha.out_proj.weight[:, torch.arange(H * D).view(H, D).t().flatten()])
    torch.testing.assert_close(mha(x, x, x), right, atol=ATOL, rtol=0)


@pytest.mark.needs("MultiHeadAttention", "causal_mask")
def test_merging_heads_with_a_view_and_no_transpose_lets_a_position_see_the_future(step, monkeypatch):
    """out.view(B, T, C) on (B, H, T, d): row t gathers head outputs of other time steps, later ones included."""
    T = 8
    mha, mask = step.model.MultiHeadAttention(d_model=32, n_heads=4), step.model.causal_mask(T)
    monkeypatch.setattr(step.model, "rearrange", merged_as(lambda t: t.reshape(t.shape[0], t.shape[2], -1)))
    x = torch.randn(1, T, 32)
    later = x.clone()
    later[:, 1] += 1.0  # only position 1 changes: the future of position 0
    assert not torch.allclose(mha(x, x, x, mask)[:, 0], mha(later, later, later, mask)[:, 0], atol=ATOL)


@pytest.mark.main_needs("CharLM")
def test_the_steps_character_model_reads_no_later_position(step):
    """The run's own model (steps 01-03), as it trains: its logits at t stay the same whatever comes after t."""
    model = step.main.CharLM(**kwargs_it_takes(step.main.CharLM, vocab_size=20, d_model=16, n_heads=2, d_ff=32,
                                                max_len=16, dropout=0.0)).eval()
    idx = torch.randint(20, (2, 8))
    changed = idx.clone()
    changed[:, 4:] = (changed[:, 4:] + 1) % 20  # every token after t = 3 differs
    torch.testing.assert_close(model(idx)[:, :4], model(changed)[:, :4], atol=0, rtol=0)  # exact, as above
