"""Bad input a learner will type, for every step's command: each gets a one-line `error:` that names the problem
and a non-zero exit, never a traceback. Steps join by the same discovery as every other test: the training
commands by `main_needs("evaluate")`, the generation command by `main_needs("stream")`.

Most cases run the command in this process (an exception other than SystemExit is what prints a traceback);
the last few run `make step` as a learner does and read what the terminal shows.
"""
import json
import subprocess

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from shared import device
from shared.steps import ROOT
from tests.conftest import data_dir_copy, mentions, small_run_flags, with_a_nan_weight

FAST = ["--max-steps", "2", "--device", "cpu", "--seed", "0"]


def refuses(step, argv, capsys, *words):
    """The command exits non-zero with `error:` and every one of `words` in what it prints, and no traceback."""
    with pytest.raises(SystemExit) as exit:
        step.main.main(argv)
    code = exit.value.code
    said = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code not in (0, None), "the command exited 0"
    assert "error:" in said and all(w in said for w in words), said
    assert "Traceback" not in said
    return said


# ---- the training commands (01-08 and every later step that trains)

@pytest.mark.main_needs("evaluate")
@pytest.mark.parametrize("flag, value", [
    ("--device", "tpu"), ("--seed", "x"), ("--seed", "-1"), ("--seed", "99999999999999999999999"),
    ("--max-steps", "0"), ("--max-steps", "1.5"), ("--max-steps", "1000000001"),
    ("--lr", "-1"), ("--lr", "0"), ("--lr", "inf"), ("--lr", "nan"),
    ("--lr", "3.5e37"),  # AdamW's first step size, 10 x lr, past float32's largest: an overflow in torch
    ("--dropout", "1.5"), ("--dropout", "1"), ("--dropout", "nan"), ("--batch-size", "0"), ("--log-every", "-1"),
])
def test_a_bad_value_is_refused_naming_the_flag(step, flag, value, capsys):
    refuses(step, [flag, value], capsys, f"argument {flag}", repr(value))


def error_line_and_help(step, flag: str, expected: str = "a positive integer") -> list[str]:
    """What a step prints for `flag 0`, where flag takes a positive integer: the error, and where the help is."""
    return [f"python -m steps.{step.name}: error: argument {flag}: expected {expected}, got '0'",
            f'(make step N={step.name[:2]} ARGS="--help" lists every flag)']


@pytest.mark.main_needs("evaluate")
def test_a_bad_flag_gets_its_error_line_and_where_the_help_is_not_the_usage_block(step, capsys):
    assert refuses(step, ["--max-steps", "0"], capsys).splitlines() == error_line_and_help(
        step, "--max-steps", "a positive integer up to 1,000,000,000")


@pytest.mark.main_needs("evaluate")
def test_a_shortened_flag_is_refused_not_taken_for_the_whole_one(step, capsys):
    refuses(step, ["--max-step", "2"], capsys, "unrecognized arguments: --max-step", "did you mean --max-steps?")


@pytest.mark.main_needs("evaluate")
def test_out_naming_a_file_is_refused(step, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("my notes")
    refuses(step, ["--out", str(tmp_path / "notes.txt")], capsys, "argument --out", "is a file")
    assert (tmp_path / "notes.txt").read_text() == "my notes"


@pytest.mark.main_needs("evaluate")
def test_an_empty_out_is_refused_not_taken_as_the_current_directory(step, capsys):
    refuses(step, ["--out", ""], capsys, "argument --out", "expected a directory, got ''")


@pytest.mark.main_needs("evaluate")
def test_out_that_cannot_be_written_is_refused(step, capsys):
    refuses(step, ["--out", "/proc/forbidden"], capsys, "argument --out", "cannot write to /proc/forbidden")


@pytest.mark.main_needs("evaluate")
def test_an_out_among_the_projects_own_files_is_refused(step, capsys):  # its checkpoint would land in steps/
    out = str(ROOT / "steps" / step.name)
    refuses(step, ["--out", out], capsys, "argument --out", f"{out} is the project's own")


@pytest.mark.main_mentions('"--d-model"')
@pytest.mark.main_needs("evaluate")
def test_an_odd_d_model_is_refused_its_sines_and_cosines_come_in_pairs(step, capsys):
    refuses(step, ["--d-model", "3"], capsys, "argument --d-model", "expected a positive, even integer, got '3'")


@pytest.mark.main_needs("hide")
def test_an_encoder_window_of_one_character_is_refused_it_may_have_none_to_hide(step, capsys):
    refuses(step, ["--block-size", "1"], capsys, "--block-size 1 is too short: give 2 or more")


@pytest.mark.main_needs("evaluate")
def test_out_with_a_name_too_long_is_refused(step, capsys):
    refuses(step, ["--out", "a" * 300], capsys, "argument --out", "(File name too long)")


@pytest.mark.main_mentions('"124M"')
def test_gpt2_124m_with_a_window_past_its_1024_positions_is_refused_before_any_work(step, capsys):
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--size", "124M", "--block-size", "1025"])
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and out == ""  # not even the 124M model's parameter count first
    assert "error: --block-size 1025 is past GPT-2's context of 1024 tokens" in err


@pytest.mark.main_needs("evaluate")
@pytest.mark.main_mentions("--n-heads")
def test_heads_that_do_not_divide_d_model_are_refused(step, capsys):
    refuses(step, ["--d-model", "30", "--n-heads", "4"], capsys, "not divisible by --n-heads")


@pytest.mark.main_needs("evaluate")
@pytest.mark.main_mentions("--n-embd")
def test_heads_that_do_not_divide_n_embd_are_refused(step, capsys):
    refuses(step, ["--n-embd", "30", "--n-head", "4"], capsys, "not divisible by --n-head")


class PastTheChecks(Exception):
    pass


def past_the_checks(seed):  # torch.manual_seed, which a step calls once its flags are checked
    raise PastTheChecks


@pytest.mark.main_mentions('"--size"')
def test_heads_are_not_checked_against_sizes_that_a_fixed_size_ignores(step, monkeypatch):
    fixed = "124M" if mentions(step, '"124M"') else "base"  # GPT-2 small, or the paper's base model
    heads = ["--n-embd", "30", "--n-head", "4"] if mentions(step, '"--n-embd"') else ["--d-model", "30", "--n-heads", "4"]
    monkeypatch.setattr(torch, "manual_seed", past_the_checks)
    with pytest.raises(PastTheChecks):
        step.main.main(["--size", fixed, *heads, "--device", "cpu"])


@pytest.mark.main_needs("evaluate")
@pytest.mark.main_mentions("--block-size")
def test_a_window_longer_than_the_data_is_refused_before_training_and_before_any_output(step, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        step.main.main([*FAST, "--out", str(tmp_path), "--block-size", "200000", "--batch-size", "1"])
    said = str(exit.value.code)
    assert said.startswith("error: --block-size 200000 does not fit") and "or less" in said
    assert capsys.readouterr().out == ""  # step 08 printed GPT-2's table of parameters first
    assert not (tmp_path / "metrics.jsonl").exists()  # refused up front, not after a first iteration


@pytest.mark.main_needs("evaluate")
def test_a_diverging_run_stops_at_the_first_nan_naming_the_iteration_and_lr(step, tmp_path, capsys):
    said = refuses(step, [*small_run_flags(step), "--lr", "1e9", "--max-steps", "20", "--device", "cpu", "--seed",
                          "0", "--out", str(tmp_path)], capsys, "training diverged")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] is None and len(rows) < 20  # stopped at the first non-finite loss
    assert f"at iteration {rows[-1]['iter']} (lr {rows[-1]['lr']:g})" in said  # the lr of that iteration
    assert json.loads((tmp_path / "summary.json").read_text())["diverged"]["iter"] == rows[-1]["iter"]


@pytest.mark.main_needs("Loader")
@pytest.mark.main_lacks("shards")  # from step 17 the data is shards, with a check of its own
def test_a_batch_larger_than_the_training_split_is_refused_with_the_batch_size_that_fits(step, tmp_path, capsys):
    # tiny shakespeare's training split is 304,222 tokens; a batch of B x T takes B*T + 1 of them (x, and y one
    # further): at T=2 the largest is 152,110, and one more, 304,222 tokens, is exactly the split and does not fit
    total = ["--total-batch-size", "304222"] if mentions(step, "--total-batch-size") else []  # one micro-batch
    refuses(step, [*FAST, "--seq-len", "2", "--batch-size", "152111", *total, "--out", str(tmp_path / "run")], capsys,
            "a batch of 152111 x 2 tokens does not fit the 304,222 training tokens", "--batch-size 152110 or less")


@pytest.mark.main_needs("evaluate")
@pytest.mark.main_mentions("data.shakespeare()")
def test_a_damaged_corpus_is_named_not_used(step, tmp_path, monkeypatch, capsys):
    data_dir_copy(tmp_path, monkeypatch, damaged="tinyshakespeare.txt")
    refuses(step, [*FAST, "--out", str(tmp_path / "run")], capsys, "tinyshakespeare.txt is damaged")


@pytest.mark.main_needs("evaluate")
@pytest.mark.main_mentions("data.gpt2_tokenizer()")
def test_a_damaged_tokenizer_file_is_named(step, tmp_path, monkeypatch, capsys):
    data_dir_copy(tmp_path, monkeypatch, damaged="r50k_base.tiktoken")
    refuses(step, [*FAST, "--out", str(tmp_path / "run")], capsys, "r50k_base.tiktoken is damaged")


@pytest.mark.main_needs("evaluate")
@pytest.mark.main_mentions("data.shakespeare()")
def test_a_missing_corpus_offline_says_where_to_put_it(step, tmp_path, monkeypatch, capsys):
    data_dir_copy(tmp_path, monkeypatch, missing="tinyshakespeare.txt")
    refuses(step, [*FAST, "--out", str(tmp_path / "run")], capsys, "tinyshakespeare.txt is not in", "GPT2STEPS_DATA")


# ---- the generation command (step 09)

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2-random")
    GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(path)
    return path


@pytest.mark.main_needs("stream")
@pytest.mark.parametrize("flag, value", [
    ("--temperature", "0"), ("--temperature", "inf"), ("--temperature", "nan"), ("--temperature", "1e-45"),
    ("--top-k", "0"), ("--top-k", "50258"), ("--max-new-tokens", "-3"), ("--num-samples", "x"),
    ("--seed", "99999999999999999999999"), ("--device", "tpu"),
])
def test_a_bad_generation_value_is_refused_naming_the_flag(step, flag, value, capsys):
    refuses(step, ["--model", "random", flag, value], capsys, f"argument {flag}", repr(value))


@pytest.mark.main_needs("stream")
def test_a_bad_generation_flag_gets_its_error_line_and_where_the_help_is_not_the_usage_block(step, capsys):
    assert refuses(step, ["--max-new-tokens", "0"], capsys).splitlines() == error_line_and_help(
        step, "--max-new-tokens", "a positive integer up to 10,000")


@pytest.mark.main_mentions('"--max-new-tokens"')
def test_more_than_10000_new_tokens_are_refused_naming_the_bound(step, capsys):
    refuses(step, ["--max-new-tokens", "10001"], capsys, "argument --max-new-tokens", "up to 10,000", "'10001'")


@pytest.mark.main_needs("stream")
def test_top_k_beyond_gpt2s_vocabulary_is_refused_before_the_model_is_looked_for(step, capsys):
    refuses(step, ["--model", "no-such-model", "--top-k", "60000"], capsys, "argument --top-k", "50257")


@pytest.mark.main_needs("stream")
def test_top_k_beyond_a_smaller_models_vocabulary_is_refused(step, tmp_path, capsys):
    GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_positions=64, n_embd=32, n_layer=2, n_head=4)).save_pretrained(
        tmp_path)
    refuses(step, ["--model", str(tmp_path), "--top-k", "1001"], capsys, "--top-k 1001 is more than the 1000 tokens")


@pytest.mark.main_needs("stream")
@pytest.mark.parametrize("name", ["no-such-model", ""])  # "": not the directory the command runs in
def test_a_model_that_is_neither_a_directory_nor_a_hub_name_is_refused(step, capsys, name):
    refuses(step, ["--model", name], capsys, f"{name!r} is neither a directory nor", "gpt2-xl", "nor random")


@pytest.mark.main_needs("stream")
def test_a_hub_name_offline_says_so(step, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # no network, whatever the environment
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))  # and nothing cached
    refuses(step, ["--model", "gpt2"], capsys, "could not download gpt2", "are you offline?")


@pytest.mark.main_needs("stream")
def test_a_truncated_checkpoint_is_refused(step, saved, tmp_path, capsys):
    for f in saved.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    blob = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    refuses(step, ["--model", str(tmp_path)], capsys, "does not hold a readable GPT-2 checkpoint")


@pytest.mark.main_needs("stream")
@pytest.mark.parametrize("vocab, words", [(1000, "the prompt has token 15496, but this model knows only 1000 tokens"),
                                          (50304, "this model has 50,304 tokens, GPT-2's tokenizer 50,257")])
def test_a_model_whose_vocabulary_is_not_the_tokenizers_is_refused(step, tmp_path, capsys, vocab, words):
    GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(
        tmp_path)
    refuses(step, ["--model", str(tmp_path), "--prompt", "Hello"], capsys, words)


@pytest.mark.main_needs("stream")
def test_a_model_with_a_nan_weight_is_refused_before_it_writes(step, saved, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--model", str(with_a_nan_weight(saved, tmp_path))])
    assert str(exit.value.code).startswith("error: --model ") and ("nan or inf in transformer.h.0.mlp.c_fc.weight (1 "
                                                                   "of its tensors), from a run that diverged"
                                                                   in str(exit.value.code))
    assert capsys.readouterr().out == ""  # not a header, a sample's line or the prompt first


@pytest.mark.main_needs("stream")
def test_a_config_whose_heads_do_not_divide_n_embd_is_refused(step, saved, tmp_path, capsys):
    for f in saved.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_head": 5}))
    refuses(step, ["--model", str(tmp_path)], capsys, "n_embd 32 is not divisible by n_head 5")


# ---- every step's command

@pytest.mark.main_mentions("refuse_a_model_too_big")
def test_a_model_too_big_for_the_free_memory_is_refused_before_it_is_built(step, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(device, "free_memory", lambda d: 2**20)  # 1 MiB free: the small run's model needs more
    refuses(step, [*FAST, *small_run_flags(step), "--out", str(tmp_path / "run")], capsys, "error: a model of",
            "AdamW's moments alone; the cpu has 1.0 MiB free", "--n-layer")


def more_memory_than_any_machine_has(*args, **kwargs):
    torch.empty(2**58, dtype=torch.uint8)  # 256 PiB, beyond any address space: torch's CPU allocator refuses it


def test_running_out_of_memory_is_one_line_with_the_tensors_size_and_the_flag_to_lower(step, tmp_path, capsys,
                                                                                        monkeypatch):
    monkeypatch.setattr(torch.nn.Embedding, "forward", more_memory_than_any_machine_has)  # every step embeds tokens
    generates = hasattr(step.main, "stream")  # step 09 only generates; every other step trains
    run = ["--model", "random"] if generates else [*FAST, *small_run_flags(step), "--out", str(tmp_path / "run")]
    refuses(step, run, capsys, "error: out of memory: a tensor of 262,144.0 TiB did not fit",
            "a smaller --batch-size")


# ---- as a learner types it: through make, in a terminal

def make_step(*args):
    return subprocess.run(["make", "-s", "step", *args], capture_output=True, text=True)


def test_make_step_with_an_unknown_step_lists_the_steps():
    r = make_step("N=99")
    assert r.returncode != 0 and "unknown step '99'" in r.stderr and "01_embedding" in r.stderr
    assert "Traceback" not in r.stderr


def test_make_step_of_a_diverging_run_stops_nonzero_without_a_traceback(tmp_path):
    r = make_step("N=03", f"ARGS=--lr 1e9 --max-steps 20 --out {tmp_path}")
    assert r.returncode != 0 and "error: the loss is nan at iteration" in r.stderr and "Traceback" not in r.stderr


def test_a_refused_run_leaves_no_empty_out_directory_behind(tmp_path):
    r = make_step("N=10", f"ARGS=--out {tmp_path / 'new' / 'run'} --n-embd 10 --n-head 3")
    assert r.returncode != 0 and "not divisible by --n-head" in r.stderr
    assert list(tmp_path.iterdir()) == []  # new/run was made to check it can be written, and removed at exit


def test_make_step_passes_a_quoted_value_of_args_as_one_argument(tmp_path):
    # as when make pasted ARGS into the recipe: read from the environment, it must still be split as the shell does
    r = make_step("N=01", f"ARGS=--max-steps 2 --out '{tmp_path / 'two words'}'")
    assert r.returncode == 0 and (tmp_path / "two words" / "metrics.jsonl").is_file()


def test_make_step_passes_a_dollar_in_args_as_typed():
    r = make_step("N=09", "ARGS=--temperature '$5 $(HOME) $$'")  # make would expand each of the three
    assert r.returncode != 0 and "got '$5 $(HOME) $$'" in r.stderr


def test_make_step_with_a_bad_flag_stops_nonzero_without_a_traceback():
    r = make_step("N=09", "ARGS=--temperature 1e-45")
    assert r.returncode != 0 and "argument --temperature" in r.stderr and "Traceback" not in r.stderr
