"""The contract of every step's run (`make step N=..`): core flags, a live log, metrics.jsonl, loss falls,
the same seed gives the same losses, a validation loss that does not change between two evaluations.
Bad input of every kind is in test_bad_input.py."""
import argparse
import contextlib
import inspect
import io
import json
import re
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from shared import data
from shared.steps import ROOT
from tests.conftest import ctrl_c_as_in_a_terminal, mentions, small_run_flags

RUN = ["--max-steps", "40", "--device", "cpu", "--seed", "0"]
pytestmark = pytest.mark.usefixtures("first_twentieth_of_the_corpus")


def run(step, tmp_path, *extra):
    step.main.main([*RUN, *small_run_flags(step), "--out", str(tmp_path), *extra])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]  # the training rows, not the trainers' validation rows


@pytest.mark.main_needs("evaluate")
def test_help_lists_max_steps_device_seed_out(step, capsys):
    with pytest.raises(SystemExit):
        step.main.main(["--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--max-steps", "--device", "--seed", "--out"))


@pytest.fixture(scope="session")
def forty(tmp_path_factory):
    """forty(step): one 40-iteration run of the step, logging every 2nd iteration and evaluating each time twice
    (made once a step, shared by the tests below): its training rows, what it printed, its --out directory and the
    pairs of validation losses."""
    made = {}

    def run_of(step):
        if step.name not in made:
            out, printed, pairs = tmp_path_factory.mktemp(f"forty-{step.name}"), io.StringIO(), []
            evaluate = step.main.evaluate

            def twice(*args):
                pairs.append((evaluate(*args), evaluate(*args)))
                return pairs[-1][0]

            with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(printed):
                m.setattr(step.main, "evaluate", twice)
                rows = run(step, out, "--log-every", "2")
            made[step.name] = rows, printed.getvalue(), out, pairs
        return made[step.name]

    return run_of


@pytest.mark.check("loss")
@pytest.mark.main_needs("evaluate")
def test_a_40_iteration_run_cuts_the_loss_by_at_least_a_tenth(step, forty):
    # on the step's own data: tiny shakespeare (characters in 01-04, GPT-2 tokens from 07 on), reversing letters in
    # 05 and 06
    rows, printed, out, _ = forty(step)
    losses = [r["loss"] for r in rows]
    assert [r["iter"] for r in rows] == list(range(40))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # measured last / first: 0.62-0.84 over the steps (0.84 in 04, 0.83 in 05); a model that does not learn gives ~1
    assert last < 0.9 * first, f"loss went from {first:.3f} to {last:.3f} in 40 iterations"
    assert "shapes through one forward pass" in printed and "iter    39" in printed  # shapes, then the live log
    end = printed.split("iter    39", 1)[1]  # after the last iteration, an evaluation of seconds says it is running
    assert "evaluating " in end and end.index("evaluating ") < end.index("speed:")
    if mentions(step, '"--preset"'):  # the trainers say it on the iteration's own line
        assert "iter    39 | evaluating" in printed
    assert (out / "loss.svg").exists() and "val_loss" in json.loads((out / "summary.json").read_text())


@pytest.mark.main_needs("FixedMemoryDecoder")
def test_the_run_counts_its_frozen_memory_among_its_parameters_and_says_how_many(step, forty):
    _, printed, _, _ = forty(step)
    frozen = (len(step.main.LETTERS) + 3) * 64  # the memory's token table at the default --d-model: 29 x 64
    assert f"139,101 parameters ({frozen:,} of them frozen)" in printed  # diary 05's numbers


@pytest.mark.main_needs("evaluate")
@pytest.mark.main_mentions("gpt2_tokenizer")  # the language models over GPT-2's 50257 tokens: 07 on
def test_first_loss_is_about_a_uniform_guess(step, forty):
    rows, _, out, _ = forty(step)
    # An untrained model's logits are about Gaussian with a std s, which costs about s^2 / 2 nats over ln(vocab):
    # 1 nat allows s up to 1.4. Step 08 with nn.Embedding's N(0, 1) init started at 42 (ln 50257 = 10.8).
    # Measured: 0.32 and 0.45 above it in 07 and 08, within 0.04 from 10 on.
    assert abs(rows[0]["loss"] - json.loads((out / "summary.json").read_text())["uniform_guess"]) < 1.0


@pytest.mark.main_needs("evaluate")
def test_validation_loss_is_the_same_number_every_time_for_the_same_weights(step, forty):
    *_, pairs = forty(step)  # each evaluation of the run, done twice in a row
    assert pairs and all(first == second for first, second in pairs)


def kwargs_it_takes(cls, **kwargs) -> dict:
    """The keyword arguments that cls's constructor has: a step's model gains some from one step to the next."""
    return {k: v for k, v in kwargs.items() if k in inspect.signature(cls).parameters}


class Bigram(nn.Module):
    """A stand-in model: a token's logits for the next one are a random table's row for it (B, T) -> (B, T, vocab),
    so that every window has a loss of its own. Given targets, it returns (logits, loss), as GPT does (08 on)."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx, targets=None):
        logits = self.table(idx)  # (B, T, vocab_size)
        return logits if targets is None else (logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


@pytest.mark.main_needs("evaluate")
@pytest.mark.main_mentions("sequential_windows")
@pytest.mark.main_lacks("Loader", "hide")  # the trainers': test_trainer.py; step 04 hides characters: test_encoder.py
def test_validation_loss_is_one_cross_entropy_over_every_window(step):
    torch.manual_seed(0)
    model, ids = Bigram(20), torch.randint(20, (30,))
    args = argparse.Namespace(batch_size=3, block_size=4, device="cpu")  # 7 windows: batches of 3, 3 and 1
    x, y = next(data.sequential_windows(ids, 7, 4))  # all 7 in one batch
    expected = F.cross_entropy(model.table(x).flatten(0, 1), y.flatten()).item()
    assert step.main.evaluate(model, ids, args) == pytest.approx(expected, rel=1e-6)  # fp32 sums in another order


@pytest.mark.main_needs("evaluate")
def test_log_every_prints_every_nth_iteration_and_the_last(step, forty):
    rows, printed, _, _ = forty(step)  # 40 iterations, --log-every 2
    logged = [int(line.split()[1]) for line in printed.splitlines() if "| loss " in line]
    assert logged == [*range(0, 40, 2), 39] and len(rows) == 40  # metrics.jsonl keeps every iteration


@pytest.mark.main_needs("main")
def test_every_flag_has_a_line_of_help_that_shows_its_default_unless_it_is_none_or_an_unset_switch(step, monkeypatch):
    parsers = []

    def capture(parser, *args, **kwargs):
        parsers.append(parser)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        step.main.main([])
    (parser,) = parsers
    formatter = parser.formatter_class(parser.prog)
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, f"{action.option_strings[0]} has no help"
            shown = "%(default)" in formatter._get_help_string(action)
            unset = action.default is None or (isinstance(action, argparse.BooleanOptionalAction)
                                               and not isinstance(action.default, bool))  # --compile's "auto"
            assert shown != unset, f"{action.option_strings[0]}: default {action.default!r}"


@pytest.mark.main_needs("main")
def test_help_never_says_default_none(step, capsys):  # the flag's own help says what happens without it
    with pytest.raises(SystemExit):
        step.main.main(["--help"])
    assert not re.search(r"\(default:\s+None\)", capsys.readouterr().out)


@pytest.mark.main_needs("evaluate")
def test_same_seed_gives_the_same_losses(step, tmp_path):
    a = run(step, tmp_path / "a", "--max-steps", "3")
    b = run(step, tmp_path / "b", "--max-steps", "3")
    assert len([r["loss"] for r in a if "loss" in r]) == 3  # three losses to compare, not two empty lists
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


@pytest.mark.main_needs("evaluate")
@pytest.mark.main_lacks("Loader")  # from step 10 on, Ctrl-C saves a checkpoint too (tests/test_trainer.py)
@pytest.mark.first_and_last  # the same lines in 01 to 08 (make diff)
def test_ctrl_c_stops_a_run_with_one_line_and_no_traceback_keeping_its_log_summary_and_curve(step, tmp_path):
    cmd = [sys.executable, "-m", f"steps.{step.name}", "--max-steps", "100000", "--log-every", "1", "--out",
           str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    for line in proc.stdout:  # wait for the second logged iteration: a curve needs two
        if line.startswith("iter     1 |"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "interrupted\n"  # 128 + SIGINT, as a shell reports Ctrl-C
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()  # the iterations done are kept
    assert rows[0].startswith('{"iter": 0') and len(rows) >= 2
    assert json.loads((tmp_path / "summary.json").read_text()) == {"interrupted": {"iters_done": len(rows)}}
    assert (tmp_path / "loss.svg").exists() and f"loss curve: {tmp_path / 'loss.svg'}" in out
