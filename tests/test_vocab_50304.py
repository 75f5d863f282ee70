"""Step 13's lesson and every step after it: the token table padded from 50257 to 50304 rows (a multiple of 128),
GPT-2's 50257-row weights still loading, and no padded id ever predicted or sampled."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tests.test_gpt2 import gpt2_params

pytestmark = pytest.mark.per_model_file  # tests of model.py alone

PADDED = pytest.mark.needs("GPTConfig.padded_vocab_size")


@pytest.mark.check("parameters")
@PADDED
def test_gpt2_small_has_124_475_904_parameters(step):
    with torch.device("meta"):
        model = step.model.GPT(step.model.GPTConfig())
    assert model.config.padded_vocab_size == 50304 == 393 * 128
    assert sum(p.numel() for p in model.parameters()) == gpt2_params(50304, 1024, 12, 768) == 124_475_904


@PADDED
def test_forgetting_to_tie_adds_a_second_padded_table(step):
    with torch.device("meta"):
        model = step.model.GPT(step.model.GPTConfig())
        tied = sum(p.numel() for p in model.parameters())  # parameters() counts a shared tensor once
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.lm_head.weight))  # untied
    assert (tied, sum(p.numel() for p in model.parameters())) == (124_475_904, 124_475_904 + 50304 * 768)


@PADDED
@pytest.mark.parametrize("vocab_size, padded", [(50257, 50304), (100, 128), (128, 128), (129, 256)])
def test_the_table_is_rounded_up_to_a_multiple_of_128(step, vocab_size, padded):
    assert step.model.GPTConfig(vocab_size=vocab_size).padded_vocab_size == padded


def tiny(step, vocab_size=100):
    config = step.model.GPTConfig(block_size=16, vocab_size=vocab_size, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    return step.model.GPT(config).eval()


@PADDED
def test_padded_ids_get_no_probability_and_no_gradient(step):
    model = tiny(step)
    idx = torch.randint(100, (2, 8))
    logits, loss = model(idx, torch.randint(100, (2, 8)))
    assert logits.shape[-1] == 128 and torch.all(logits[..., 100:] == float("-inf"))
    assert torch.all(logits.softmax(-1)[..., 100:] == 0) and torch.isfinite(loss)
    loss.backward()
    assert torch.all(model.transformer.wte.weight.grad[100:] == 0)  # never an input, never a possible output


@PADDED
def test_sampling_never_returns_a_padded_id_even_when_its_row_would_win(step):
    model = tiny(step)
    with torch.no_grad():  # ln_f's output is now n + 10, n of mean 0 over the features: a padded row of ones scores
        model.transformer.ln_f.bias.fill_(10.0)  # 16 x 10 = 160 for every hidden state, a real row (std 0.02) about 1
        model.transformer.wte.weight[100:] = 1.0
        unmasked = model.transformer.ln_f(torch.randn(64, 16)) @ model.transformer.wte.weight.T  # (64, 128)
    assert torch.all(unmasked.softmax(-1)[:, 100:].sum(-1) > 0.99)  # unmasked, the padded ids would win every draw
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), max_new_tokens=15,
                         generator=torch.Generator().manual_seed(0))
    assert out.max() < 100


@PADDED
def test_gpt2_weights_of_50257_rows_load_with_zero_padding(step, tmp_path):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    hf.save_pretrained(tmp_path)
    model = step.model.GPT.from_pretrained(str(tmp_path))
    wte = model.transformer.wte.weight
    assert wte.shape == (50304, 16) and torch.equal(wte[:50257], hf.transformer.wte.weight)
    assert torch.all(wte[50257:] == 0) and model.lm_head.weight is wte


@PADDED
def test_the_exported_model_has_the_tokenizers_50257_rows(step, tmp_path):
    model = tiny(step, vocab_size=50257)
    model.save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert hf.config.vocab_size == 50257 and hf.transformer.wte.weight.shape == (50257, 16)
