"""Step 12's lesson and every trainer after it: F.scaled_dot_product_attention in place of the written-out
attention, torch.compile with a fallback to eager, and batches that are views of tokens already on the device."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import small_run_flags

CPU = torch.device("cpu")
# fp32 throughout. SDPA and torch.compile compute the same sums as the eager code in another order (fused, blocked):
# a few float32 rounding steps (1.2e-7 relative) at values of order 1, so 1e-5 absolute is ample and still tight
# (9e-8 measured on this CPU).
ATOL = 1e-5


@pytest.mark.main_needs("compiled")
@pytest.mark.per_model_file
def test_sdpa_is_causal_gives_the_written_out_attention_with_a_causal_mask(step):
    module = step.model.CausalSelfAttention(step.model.GPTConfig(n_embd=24, n_head=3))
    x = torch.randn(2, 7, 24)
    q, k, v = (t.transpose(1, 2) for t in module.c_attn(x).view(2, 7, 3, 3, 8).unbind(2))  # (B, H, T, d) each
    explicit, _ = step.model.attention(q, k, v, step.model.causal_mask(7))
    expected = module.c_proj(explicit.transpose(1, 2).reshape(2, 7, 24))
    torch.testing.assert_close(module(x), expected, atol=ATOL, rtol=0)


@pytest.mark.main_needs("compiled")
@pytest.mark.per_model_file
def test_sdpa_with_a_padding_mask_gives_the_written_out_attention(step):
    module = step.model.CausalSelfAttention(step.model.GPTConfig(n_embd=24, n_head=3))
    x = torch.randn(2, 7, 24)
    mask = step.model.padded_causal_mask(torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]))
    q, k, v = (t.transpose(1, 2) for t in module.c_attn(x).view(2, 7, 3, 3, 8).unbind(2))
    explicit, _ = step.model.attention(q, k, v, mask)
    expected = module.c_proj(explicit.transpose(1, 2).reshape(2, 7, 24))
    torch.testing.assert_close(module(x, mask), expected, atol=ATOL, rtol=0)


@pytest.mark.main_needs("compiled")
@pytest.mark.per_model_file
def test_a_0_1_float_mask_is_added_to_the_scores_and_hides_nothing(step):
    # SDPA reads a bool mask as "may attend" and adds a float mask to the scores. The same causal mask as 1.0/0.0
    # floats adds 1 to the visible scores and hides no future key; as 0/-inf floats it is the bool mask.
    q, k, v = torch.randn(3, 1, 2, 6, 8).unbind(0)  # (B, H, T, d) each
    causal = step.model.causal_mask(6)
    right = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
    zero_one = F.scaled_dot_product_attention(q, k, v, attn_mask=causal.float())
    as_floats = torch.zeros(6, 6).masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=as_floats), right, atol=ATOL, rtol=0)
    later = v.clone()
    later[:, :, -1] += 1.0  # only the last position's value changes
    again = F.scaled_dot_product_attention(q, k, later, attn_mask=causal.float())
    assert not torch.allclose(again[:, :, 0], zero_one[:, :, 0], atol=ATOL)  # position 0 reads the last one


@pytest.mark.main_needs("compiled")
@pytest.mark.per_model_file
def test_on_a_cpu_sdpa_given_a_mask_and_is_causal_applies_both(step):
    # torch's documentation says the two together raise. torch 2.13 on a CPU: the flash kernel, the one chosen here,
    # applies both; the math kernel raises ("Explicit attn_mask should not be set when is_causal=True"). Diary 12.
    q, k, v = torch.randn(3, 1, 2, 7, 8).unbind(0)
    real = torch.tensor([0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)
    pads = (real | torch.eye(7, dtype=torch.bool))[None, None]  # (1, 1, T, T): real keys and itself, no causal part
    both = F.scaled_dot_product_attention(q, k, v, attn_mask=pads, is_causal=True)
    combined = F.scaled_dot_product_attention(q, k, v, attn_mask=pads & step.model.causal_mask(7))
    torch.testing.assert_close(both, combined, atol=ATOL, rtol=0)
    for one in dict(attn_mask=pads), dict(is_causal=True):  # and neither alone gives it: neither was dropped
        assert not torch.allclose(F.scaled_dot_product_attention(q, k, v, **one), both, atol=ATOL)


@pytest.mark.main_needs("compiled")
@pytest.mark.per_model_file
def test_the_attention_gives_sdpa_a_mask_or_is_causal_never_both(step, monkeypatch):
    calls, sdpa = [], F.scaled_dot_product_attention  # both at once: applied on one kernel, an error on another
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(kw) or sdpa(*a, **kw))
    module = step.model.CausalSelfAttention(step.model.GPTConfig(n_embd=24, n_head=3))
    x = torch.randn(1, 7, 24)
    module(x)
    module(x, step.model.padded_causal_mask(torch.tensor([[0, 0, 0, 1, 1, 1, 1]])))
    assert len(calls) == 2 and all(kw.get("attn_mask") is None or not kw.get("is_causal") for kw in calls), calls
    assert calls[0].get("is_causal") and calls[1].get("attn_mask") is not None  # no mask: is_causal; a mask: it alone


@pytest.mark.main_needs("compiled")
@pytest.mark.per_model_file
def test_is_causal_alone_does_not_hide_the_pads_of_a_padded_batch(step):
    module = step.model.CausalSelfAttention(step.model.GPTConfig(n_embd=24, n_head=3))
    x = torch.randn(1, 7, 24)
    mask = step.model.padded_causal_mask(torch.tensor([[0, 0, 0, 1, 1, 1, 1]]))  # 3 pads on the left
    real = slice(3, None)
    assert not torch.allclose(module(x)[:, real], module(x, mask)[:, real], atol=ATOL)  # the real tokens read pads


@pytest.mark.main_needs("compiled")
@pytest.mark.per_model_file
def test_a_compiled_model_gives_the_eager_models_logits(step):
    torch.manual_seed(0)
    model = step.model.GPT(step.model.GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=16,
                                                dropout=0.0)).eval()
    idx = torch.randint(100, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(idx)[0], model(idx)[0], atol=ATOL, rtol=0)


def small_batch(step):
    model = step.model.GPT(step.model.GPTConfig(block_size=8, vocab_size=100, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(100, (2, 8))
    return model, x, x


@pytest.mark.main_needs("compiled")
def test_compile_is_off_by_default_on_a_cpu_and_says_how_to_force_it(step):
    model, x, y = small_batch(step)
    fast, note = step.main.compiled(model, SimpleNamespace(compile="auto", device=CPU, dtype="fp32"), x, y)
    assert fast is model and "--compile forces it" in note


@pytest.mark.main_needs("compiled")
@pytest.mark.usefixtures("compile_fails")
def test_a_failing_compile_falls_back_to_eager_and_says_why(step):
    model, x, y = small_batch(step)
    fast, note = step.main.compiled(model, SimpleNamespace(compile=True, device=CPU, dtype="fp32"), x, y)
    assert fast is model and note == "compile failed (RuntimeError: no C++ compiler found); running eager"


@pytest.mark.main_needs("compiled")
def test_a_compile_failing_after_its_backward_leaves_no_gradients_behind(step, monkeypatch):
    def fails_after_backward(model):  # the try's forward and backward run and fill .grad, then it fails
        def call(x, y):
            model(x, y)[1].backward()
            raise RuntimeError("the backward graph failed")
        return call
    monkeypatch.setattr(torch, "compile", fails_after_backward)
    model, x, y = small_batch(step)
    fast, _ = step.main.compiled(model, SimpleNamespace(compile=True, device=CPU, dtype="fp32"), x, y)
    # the try's gradients (a model's worth of memory) are freed at once; the loop's zero_grad would only come later
    assert fast is model and all(p.grad is None for p in model.parameters())


@pytest.mark.main_needs("compiled")
def test_a_compile_that_works_gives_the_compiled_model_to_train(step, monkeypatch):
    made = []

    def compiles(model):  # stands for torch.compile: a new callable that runs the model
        made.append(lambda *inputs: model(*inputs))
        return made[-1]
    monkeypatch.setattr(torch, "compile", compiles)
    model, x, y = small_batch(step)
    fast, note = step.main.compiled(model, SimpleNamespace(compile=True, device=CPU, dtype="fp32"), x, y)
    assert fast is made[0] and note.startswith("compiled in")


@pytest.mark.main_needs("compiled")
@pytest.mark.parametrize("compile_fails", [""], indirect=True)
def test_a_compile_failing_with_an_empty_message_is_named_not_a_traceback(step, compile_fails):
    model, x, y = small_batch(step)
    fast, note = step.main.compiled(model, SimpleNamespace(compile=True, device=CPU, dtype="fp32"), x, y)
    assert fast is model and note == "compile failed (RuntimeError); running eager"


@pytest.mark.main_needs("Loader")
@pytest.mark.main_lacks("shards")  # from step 17 on, a batch is windows copied out of memory-mapped shards
def test_the_loaders_batches_are_views_of_its_tokens_not_copies(step):
    ids = torch.arange(100)
    x, y = step.main.Loader(ids, batch_size=2, seq_len=8).next_batch()
    assert x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr() == ids.untyped_storage().data_ptr()


@pytest.mark.main_needs("compiled")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_a_compiled_run_trains_through_the_compiled_model(step, tmp_path, monkeypatch):
    calls = []

    def compiles(model):  # stands for torch.compile: a new callable that runs the model, and counts its calls
        return lambda *inputs: calls.append(1) or model(*inputs)
    monkeypatch.setattr(torch, "compile", compiles)
    step.main.main(["--device", "cpu", "--seed", "0", *small_run_flags(step), "--compile", "--max-steps", "2",
                    "--max-new-tokens", "1", "--out", str(tmp_path)])
    micro_steps = 2 if "--total-batch-size" in small_run_flags(step) else 1  # 128 tokens in micro-batches of 2 x 32
    assert len(calls) == 1 + 2 * micro_steps  # the try, then every training forward
