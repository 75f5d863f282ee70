"""Step 18's lesson and every step after it: generation with a KV cache. Each layer keeps the keys and values of the
positions it has seen; a prefill fills them from the prompt, then each step feeds only the newest token, at its
position. The path without the cache (a whole forward a token) and transformers' generate are the references."""

import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from shared import data
from shared.steps import ROOT
from tests.conftest import ctrl_c_as_in_a_terminal, small_run_flags, with_a_nan_weight
from tests.refs import distinct_biases, distinct_layer_norms

pytestmark = pytest.mark.needs("KVCache")
# A small GPT-2 with a context of 64 tokens, so that a test can write past it.
SMALL = dict(block_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def small_model(step, seed: int = 0):
    torch.manual_seed(seed)
    return step.model.GPT(step.model.GPTConfig(**SMALL)).eval()


def greedy(model, idx, n: int, **kwargs):
    return model.generate(idx, n, top_k=1, **kwargs)


@pytest.mark.parametrize("prompt", [1, 50])
def test_greedy_tokens_with_the_cache_are_those_without_it_also_past_the_context(step, prompt):
    model, idx = small_model(step), torch.randint(50257, (1, prompt), generator=torch.Generator().manual_seed(1))
    with_cache, without = greedy(model, idx, 40), greedy(model, idx, 40, use_cache=False)
    assert with_cache.size(1) == prompt + 40 and torch.equal(with_cache, without)  # 50 + 40 > 64: the window slid


def logits_of_each_new_token(model, idx, n: int, **kwargs):
    """(n, B, vocab): the logits each of generate's n steps samples from, read from the model's forward."""
    seen = []
    hook = model.register_forward_hook(lambda module, args, out: seen.append(out[0][:, -1]))
    try:
        greedy(model, idx, n, **kwargs)
    finally:
        hook.remove()
    return torch.stack(seen)


def test_past_the_context_the_logits_with_the_cache_are_those_without_it(step):
    """Greedy tokens of a small random model often repeat one token and cannot tell close logits apart: the logits
    can. 50 + 40 > 64: the last 26 steps are past the context, each a new cache over the last 64 tokens."""
    model, idx = small_model(step), torch.randint(50257, (1, 50), generator=torch.Generator().manual_seed(1))
    with_cache, without = logits_of_each_new_token(model, idx, 40), logits_of_each_new_token(model, idx, 40,
                                                                                            use_cache=False)
    # fp32; the same sums, split between a prefill and one-token steps: rounding differences only (1.8e-7 measured)
    torch.testing.assert_close(with_cache, without, atol=1e-5, rtol=0)


@pytest.mark.parametrize("prompt", [1, 50])
def test_greedy_tokens_with_the_cache_are_transformers_generate(step, prompt, tmp_path):
    model = distinct_biases(distinct_layer_norms(small_model(step)))  # as built all 0 (and 1): a left-out one would pass
    model.save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(50257, (1, prompt), generator=torch.Generator().manual_seed(2))
    n = 64 - prompt  # up to the context: transformers' GPT-2 has no position embedding past it
    theirs = hf.generate(idx, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=50256)
    assert torch.equal(greedy(model, idx, n), theirs)


def cached_and_full_logits(step, model, ids: torch.Tensor, k: int):
    """The last position's logits after a prefill of ids[:, :-k] and k cached steps, and after one forward over all."""
    cache = step.model.KVCache(model.config)
    model(ids[:, :-k], cache=cache)
    for t in range(ids.size(1) - k, ids.size(1)):
        cached = model(ids[:, t : t + 1], cache=cache)[0][:, -1]  # (B, vocab)
    return cached, model(ids)[0][:, -1]


def test_after_a_prefill_and_cached_steps_the_logits_are_a_full_forwards(step):
    model, ids = small_model(step), torch.randint(50257, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cached, full = cached_and_full_logits(step, model, ids, k=10)
    # fp32; the same sums, split between the prefill and 10 one-token steps: rounding differences only (1.2e-7
    # measured at logits below 0.5, where 1e-5 is some 300 rounding steps: room for other CPUs' kernels)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=0)


def test_the_position_of_a_new_token_taken_as_0_is_caught_by_the_full_forward(step, monkeypatch):
    """The classic mistake: the newest token's position embedding taken at position 0 (its index in the one-token
    input) instead of at its position in the sequence. Every shape fits; only a reference sees it."""
    model, ids = small_model(step), torch.randint(50257, (1, 40), generator=torch.Generator().manual_seed(4))
    class FromZero(torch.nn.Module):  # the position table, read as if every call started at position 0
        def __init__(self, wpe):
            super().__init__()
            self.wpe = wpe

        def forward(self, pos):
            return self.wpe(pos - pos[..., :1])

    monkeypatch.setattr(model.transformer, "wpe", FromZero(model.transformer.wpe))
    with torch.no_grad():
        cached, full = cached_and_full_logits(step, model, ids, k=10)
    assert not torch.allclose(cached, full, atol=1e-3)  # 0.4 apart as measured: far beyond rounding (1e-7)


def test_a_padded_batch_generates_each_row_as_if_it_were_alone(step):
    model, gen = small_model(step), torch.Generator().manual_seed(5)
    prompts = [torch.randint(50257, (n,), generator=gen) for n in (3, 12, 7)]
    width = max(len(p) for p in prompts)
    ids, mask = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left-padded: the next token of every row is at the same column
        ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
    batch = greedy(model, ids, 60, attention_mask=mask)  # 12 + 60 > 64: the longest row slides
    for i, p in enumerate(prompts):
        assert torch.equal(batch[i, width:], greedy(model, p[None], 60)[0, len(p) :]), f"row {i}"


def test_sampling_with_a_seed_gives_the_same_tokens_with_and_without_the_cache(step):
    model, idx = small_model(step), torch.randint(50257, (1, 8), generator=torch.Generator().manual_seed(6))
    runs = [model.generate(idx, 30, top_k=50, generator=torch.Generator().manual_seed(7), use_cache=cache)
            for cache in (True, False)]
    assert torch.equal(*runs)


def test_the_cache_is_not_kept_between_two_calls(step):
    model, gen = small_model(step), torch.Generator().manual_seed(8)
    first, second = torch.randint(50257, (1, 20), generator=gen), torch.randint(50257, (1, 5), generator=gen)
    fresh = greedy(small_model(step), second, 10)
    greedy(model, first, 10)
    assert torch.equal(greedy(model, second, 10), fresh)


def test_the_cache_holds_2_x_layers_x_batch_x_context_x_width_numbers(step):
    model = small_model(step)
    cache = step.model.KVCache(model.config)
    with torch.no_grad():
        model(torch.randint(50257, (3, 5)), cache=cache)
    assert cache.length == 5 and cache.nbytes() == 2 * 2 * 3 * 64 * 32 * 4  # fp32: 4 bytes a number


# ---- the command

@pytest.fixture
def saved(step, tmp_path):
    """A small untrained model of the step, as a model/ directory."""
    small_model(step).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.main_needs("generate_only")
@pytest.mark.parametrize("cache", ["--cache", "--no-cache"])
def test_generate_only_streams_a_sample_and_times_the_prefill_and_the_decoding(step, saved, cache, capsys):
    step.main.main(["--generate-only", "--model", str(saved), "--prompt", "ROMEO:", "--max-new-tokens", "20",
                    "--device", "cpu", "--seed", "0", "--top-k", "1", cache])
    out = capsys.readouterr().out
    assert out.count("ROMEO:") == 1 and "the first token after" in out and "tokens/s" in out
    assert ("KV cache" if cache == "--cache" else "no cache") in out


@pytest.mark.main_needs("generate_only")
def test_ctrl_c_while_generate_only_writes_ends_the_line_and_stops_in_one_line(step, saved, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", f"steps.{step.name}", "--generate-only", "--model", str(saved),
                             "--device", "cpu", "--prompt", "Hello", "--max-new-tokens", "10000", "--no-cache"],
                            cwd=tmp_path, env=os.environ | {"PYTHONPATH": str(ROOT)},  # runs/ in tmp_path, if any
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    for line in proc.stdout:  # until the model is built and the sample begins
        if line.startswith("---"):
            break
    else:
        pytest.fail(f"no sample began: {proc.communicate()[1][-2000:]}")
    proc.stdout.read(len("Hello") + 5)  # the prompt and a few characters of the sample: it is writing
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "interrupted\n", err[-2000:]  # 128 + SIGINT, no traceback
    assert out.endswith("\n")  # the text so far ends its line: "interrupted" is not glued to its last word


@pytest.mark.main_needs("generate_only")
def test_generate_only_with_flags_of_training_is_refused_not_ignored(step, capsys):
    with pytest.raises(SystemExit) as exit:  # refused as it is parsed: no model needed
        step.main.main(["--generate-only", "--model", "m", "--no-cache", "--resume", ".", "--max-steps", "5"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--max-steps, --resume with --generate-only: it writes with --model" in err


@pytest.mark.main_needs("generate_only")
def test_eval_only_and_generate_only_together_are_refused_not_one_silently_skipped(step, capsys):
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--eval-only", "--generate-only", "--hellaswag", "val", "--device", "cpu"])
    assert exit.value.code == 2 and "--eval-only and --generate-only: one at a time" in capsys.readouterr().err


@pytest.mark.main_needs("generate_only")
@pytest.mark.parametrize("cache", ["--cache", "--no-cache"])
def test_generate_only_past_the_context_says_it_slides(step, saved, capsys, cache):
    step.main.main(["--generate-only", "--model", str(saved), "--prompt", "word " * 80, "--max-new-tokens", "3",
                    "--device", "cpu", cache])
    out = capsys.readouterr().out
    assert "the model sees the last 64" in out and "a sliding window" in out
    assert ("the cache is filled again" in out) == (cache == "--cache")  # no cache, nothing to fill
    assert "tokens/s past its 64-token context" in out  # its speed there said apart from the speed within it


@pytest.mark.main_needs("generate_only")
@pytest.mark.parametrize("past, noted", [(0, False), (1, True)])
def test_generate_only_says_it_slides_only_when_a_token_is_read_past_the_context(step, saved, capsys, past, noted):
    prompt = "word " * 10
    new = 64 - len(data.gpt2_tokenizer().encode(prompt)) + 1 + past  # the last token sampled is not read: at past=0,
    step.main.main(["--generate-only", "--model", str(saved), "--prompt", prompt, "--max-new-tokens", str(new),
                    "--device", "cpu"])  # the prompt and the new tokens but the last fill the 64 exactly
    assert ("a sliding window" in capsys.readouterr().out) == noted


@pytest.mark.main_needs("generate_only")
def test_generate_only_with_the_cache_and_without_writes_the_same_greedy_text(step, saved, capsys):
    texts = []
    for cache in ("--cache", "--no-cache"):
        step.main.main(["--generate-only", "--model", str(saved), "--max-new-tokens", "80", "--top-k", "1",
                        "--device", "cpu", "--dtype", "fp32", cache])
        texts.append(capsys.readouterr().out.split("-" * 60)[1].split("\n[")[0])
    assert texts[0] == texts[1] and len(texts[0]) > len("ROMEO:")


@pytest.mark.main_needs("generate_only")
@pytest.mark.parametrize("flags, words", [(["--model", "no-such-model"], "is neither a directory nor"),
                                          (["--model", ""], "'' is neither a directory nor")])
def test_generate_only_refuses_bad_input_in_one_line(step, saved, flags, words):
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--generate-only", "--model", str(saved), "--device", "cpu", *flags])
    assert str(exit.value.code).startswith("error:") and words in str(exit.value.code)
    assert "\n" not in str(exit.value.code)


@pytest.mark.main_needs("generate_only")
def test_generate_only_under_several_processes_is_refused_before_the_model_is_looked_for(step, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # make step N=18 NPROC=2: torchrun sets them
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--generate-only", "--model", "no-such-model"])
    assert exit.value.code == 2 and ("--generate-only with 2 processes: each would write the same text; writing is "
                                     "one process's work (leave NPROC out)") in capsys.readouterr().err


@pytest.mark.main_needs("generate_only")
def test_generate_only_refuses_top_k_beyond_a_smaller_models_vocabulary(step, tmp_path):
    torch.manual_seed(0)
    step.model.GPT(step.model.GPTConfig(**SMALL, vocab_size=1000)).save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--generate-only", "--model", str(tmp_path), "--device", "cpu", "--top-k", "1001"])
    assert exit.value.code == "error: --top-k 1001 is more than the 1000 tokens of the vocabulary"


@pytest.mark.main_needs("generate_only")
def test_generate_only_refuses_top_k_beyond_gpt2s_vocabulary_before_the_model_is_looked_for(step, capsys):
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--generate-only", "--model", "no-such-model", "--top-k", "60000"])
    assert exit.value.code == 2 and "argument --top-k: expected from 1 to 50257 tokens" in capsys.readouterr().err


@pytest.mark.main_needs("generate_only")
def test_generate_only_refuses_a_model_with_a_nan_weight(step, saved, tmp_path):
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--generate-only", "--model", str(with_a_nan_weight(saved, tmp_path / "nan")), "--device",
                        "cpu"])
    assert "nan or inf in transformer.h.0.mlp.c_fc.weight" in str(exit.value.code)


@pytest.mark.main_needs("generate_only")
@pytest.mark.parametrize("vocab, words", [(1000, "the prompt has token 15496, but this model knows only 1000 tokens"),
                                          (50304, "this model has 50,304 tokens, GPT-2's tokenizer 50,257")])
def test_generate_only_refuses_a_model_whose_vocabulary_is_not_the_tokenizers(step, tmp_path, vocab, words):
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        tmp_path)
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--generate-only", "--model", str(tmp_path), "--device", "cpu", "--prompt", "Hello"])
    assert str(exit.value.code).startswith("error:") and words in str(exit.value.code)


@pytest.mark.main_needs("generate_only")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_the_sample_after_training_uses_the_cache_and_says_how_fast(step, tmp_path, capsys):
    step.main.main([*small_run_flags(step), "--max-steps", "2", "--device", "cpu", "--seed", "0",
                    "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "[KV cache: the first token after" in out
    numbers, size, unit, dtype = re.search(r"= ([\d,]+) numbers, ([\d.]+) (KiB|MiB) in (fp32|bf16)\]", out).groups()
    nbytes = int(numbers.replace(",", "")) * {"fp32": 4, "bf16": 2}[dtype]
    # said to 1 decimal, of a value of at least 1 in its unit (shared/cli.py): within 0.05 / 1 = 5% (8.0 KiB here)
    assert float(size) * {"KiB": 2**10, "MiB": 2**20}[unit] == pytest.approx(nbytes, rel=0.05)


@pytest.mark.main_needs("generate_only")
def test_generate_only_hands_its_sampling_flags_to_the_model(step, saved, monkeypatch):
    given, stream = [], step.model.GPT.stream

    def recording(self, idx, max_new_tokens, **kwargs):
        given.append({"max_new_tokens": max_new_tokens, **kwargs})
        return stream(self, idx, max_new_tokens, **kwargs)
    monkeypatch.setattr(step.model.GPT, "stream", recording)
    step.main.main(["--generate-only", "--model", str(saved), "--max-new-tokens", "3", "--num-samples", "2",
                    "--top-k", "7", "--temperature", "0.5", "--no-cache", "--device", "cpu", "--seed", "0"])
    assert len(given) == 2 and all(g.pop("generator") is not None for g in given)
    assert given == [dict(max_new_tokens=3, top_k=7, temperature=0.5, use_cache=False)] * 2
