"""Step 10's lesson and every trainer after it (the steps whose __main__.py has a Loader): GPT-2's init, the data
loader, checkpoints that resume exactly, Ctrl-C, and the trained model written as a GPT2LMHeadModel directory.
The shared run tests (loss falls, same seed, the log) are in test_steps.py; bad input in test_bad_input.py."""
import contextlib
import importlib
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2LMHeadModel

from shared import checkpoint, runlog
from shared.steps import ROOT
from tests.conftest import mentions, small_run_flags, token_loader

RUN = ["--device", "cpu", "--seed", "0"]
pytestmark = pytest.mark.usefixtures("first_twentieth_of_the_corpus")


def run(step, out, *extra):
    """A small trainer run into `out`; returns the training losses and the validation losses by iteration."""
    step.main.main([*RUN, *small_run_flags(step), "--out", str(out), *extra])
    return metrics(out)


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """finished(step, tmp_path): a copy, in tmp_path, of one finished 3-iteration run of the step (made once, or
    first by finished.made(step)); finished.printed[step.name]: what it printed (kept from the test that made it,
    whose capsys it is not)."""
    runs, printed = {}, {}

    def made(step):
        if step.name not in runs:
            out, said = tmp_path_factory.mktemp(f"run-{step.name}"), io.StringIO()
            with contextlib.redirect_stdout(said):
                run(step, out, "--max-steps", "3", "--eval-every", "2", "--lr", "1e-3")
            runs[step.name], printed[step.name] = out, said.getvalue()  # only once it finished
        return runs[step.name]

    def copy_of(step, tmp_path):
        shutil.copytree(made(step), tmp_path, dirs_exist_ok=True)
        return tmp_path

    copy_of.made, copy_of.printed = made, printed
    return copy_of


def metrics(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["iter"], r["loss"]) for r in rows if "loss" in r], [(r["iter"], r["val_loss"]) for r in rows
                                                                   if "val_loss" in r]


# ---- GPT-2's init

@pytest.mark.needs("GPT.save_pretrained")
@pytest.mark.per_model_file
def test_gpt2_init_statistics_per_parameter_group(step):
    torch.manual_seed(0)
    n_layer = 4
    model = step.model.GPT(step.model.GPTConfig(block_size=256, vocab_size=1000, n_layer=n_layer, n_head=4,
                                                n_embd=256))
    for name, p in model.named_parameters():
        if name.endswith(".bias"):
            assert torch.all(p == 0), name
        elif "ln_" in name:
            assert torch.all(p == 1), name  # LayerNorm gains start at 1
        else:  # matrices and embeddings: normal, std 0.02, or 0.02 / sqrt(2 n_layer) for the residual projections
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
            # The std of n normal samples is off by about std / sqrt(2n) (n >= 65,536 here, so 0.3%); the mean by
            # std / sqrt(n). Five times these leave a 1-in-a-million chance of a false alarm per parameter.
            n = p.numel()
            assert abs(p.std().item() - std) < 5 * std / math.sqrt(2 * n), (name, p.std().item(), std)
            assert abs(p.mean().item()) < 5 * std / math.sqrt(n), name


# ---- AdamW

@pytest.mark.main_needs("Loader")
@pytest.mark.main_lacks("param_groups")
def test_before_step_14_no_parameter_is_decayed(step, finished, tmp_path):
    # torch's AdamW decays every parameter by 0.01 unless told otherwise, LayerNorm gains and biases included: the
    # mistake step 14 teaches. Until step 14 brings weight decay, the trainers ask for none.
    groups = checkpoint.load(finished(step, tmp_path))["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0]


@pytest.mark.main_needs("param_groups")
def test_from_step_14_the_runs_optimizer_decays_one_group_by_weight_decay_and_the_other_not(step, finished, tmp_path):
    # param_groups() is tested on its own (test_gpt3_hparams.py); this is that the run builds AdamW from it, each
    # group with its own decay, not one weight_decay= for both
    groups = checkpoint.load(finished(step, tmp_path))["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [step.main.WEIGHT_DECAY, 0.0] and all(g["params"] for g in groups)


# ---- the training loop

@pytest.mark.main_needs("Loader")
def test_a_training_forwards_logits_are_freed_before_its_backward(step, tmp_path, monkeypatch):
    # The logits, (B, T, vocab_size), are the largest tensor of a forward pass: 206 MB a sequence of 1024 in fp32.
    # Nothing in backward needs them; kept under a name (`_, loss =`), they would add to its peak.
    returned, checked = [], []  # a weak reference to each training forward's logits (it dies with them); backwards
    forward, backward = step.model.GPT.forward, torch.Tensor.backward

    def watched_forward(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if torch.is_grad_enabled():
            returned.append(weakref.ref(out[0]))
        return out

    def watched_backward(self, *args, **kwargs):
        assert all(ref() is None for ref in returned), "a forward's logits are still alive at backward"
        checked.append(len(returned))
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(step.model.GPT, "forward", watched_forward)
    monkeypatch.setattr(torch.Tensor, "backward", watched_backward)
    run(step, tmp_path, "--max-steps", "3")
    assert len(returned) >= 3  # one forward an iteration at least (two micro-batches from step 15 on)
    assert checked == list(range(1, len(returned) + 1))  # and after each, its backward, watched


@pytest.mark.main_needs("ctrl_c_stops_between_iterations")
def test_after_the_loop_ctrl_c_stops_at_once_again_while_the_model_is_saved(step, tmp_path, monkeypatch):
    # the loop's handler only sets a flag that the next iteration reads: left in place after the loop, a Ctrl-C
    # while the model is saved or the sample written would be said and then ignored
    during, save = [], step.main.GPT.save_pretrained
    monkeypatch.setattr(step.main.GPT, "save_pretrained",
                        lambda self, *a, **k: during.append(signal.getsignal(signal.SIGINT)) or save(self, *a, **k))
    before = signal.getsignal(signal.SIGINT)
    run(step, tmp_path, "--max-steps", "1")
    assert during == [before] and signal.getsignal(signal.SIGINT) is before


# ---- the data loader

@pytest.mark.main_needs("Loader")
def test_loader_walks_consecutive_windows_and_wraps_around(step):
    loader = token_loader(step, torch.arange(40), batch_size=2, seq_len=8)
    x, y = loader.next_batch()
    assert torch.equal(x, torch.tensor([list(range(0, 8)), list(range(8, 16))])) and torch.equal(y, x + 1)
    x, _ = loader.next_batch()
    assert x[0, 0] == 16  # the next batch starts where this one ended
    x, _ = loader.next_batch()  # 32 + 17 > 40 ids: the split is used up, start again
    assert x[0, 0] == 0


@pytest.mark.main_needs("Loader")
def test_loader_is_determined_by_its_position(step):
    a = token_loader(step, torch.arange(1000), batch_size=3, seq_len=16)
    for _ in range(5):
        a.next_batch()
    b = token_loader(step, torch.arange(1000), batch_size=3, seq_len=16, pos=a.pos)
    assert all(torch.equal(u, v) for u, v in zip(a.next_batch(), b.next_batch()))


@pytest.mark.main_needs("Loader")
@pytest.mark.main_lacks("shards")  # from step 17 on, a batch is the next B windows, of this epoch or the next
@pytest.mark.parametrize("n_ids, second", [(33, 16), (32, 0)])  # from 16, a batch of 2 x 8 needs ids 16..32
def test_loader_takes_a_batch_that_ends_on_the_last_id_and_starts_again_one_id_short_of_it(step, n_ids, second):
    loader = token_loader(step, torch.arange(n_ids), batch_size=2, seq_len=8)
    loader.next_batch()
    x, y = loader.next_batch()
    assert x[0, 0] == second and y[-1, -1] == second + 16


# ---- evaluation

@pytest.mark.main_needs("Loader")
def test_the_validation_loss_is_the_mean_over_every_token_of_every_window(step):
    model = step.model.GPT(step.model.GPTConfig(block_size=8, vocab_size=100, n_layer=1, n_head=2, n_embd=16))
    ids = torch.randint(100, (7 * 8 + 1,))  # 7 windows of 8: batches of 3, 3 and 1, so each must count by its size
    args = SimpleNamespace(batch_size=3, seq_len=8, device=torch.device("cpu"), dtype="fp32", world=1, rank=0)
    with torch.no_grad():
        every_token = model.eval()(ids[:-1].view(7, 8), ids[1:].view(7, 8))[1].item()
    # fp32: the same losses summed in another order, a few rounding steps of 2^-24 apart (one measured: 1e-7 relative)
    assert step.main.evaluate(model.train(), ids, args) == pytest.approx(every_token, rel=1e-6)


# ---- checkpoints and resuming

def interrupt_after(iteration, monkeypatch):
    """Ctrl-C, as a terminal sends it, right after the given iteration is logged."""
    log = runlog.RunLog.log

    def log_then_ctrl_c(self, it, *args, **kwargs):
        log(self, it, *args, **kwargs)
        if it == iteration:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(runlog.RunLog, "log", log_then_ctrl_c)


SIX = ["--max-steps", "6", "--eval-every", "3", "--dropout", "0.1"]  # dropout: a resume must restore the generator


@pytest.fixture(scope="session")
def interrupted(tmp_path_factory):
    """interrupted(step): a run of SIX stopped by Ctrl-C after iteration 3 (made once a step, read, never written):
    its directory, its exit code and what it printed."""
    runs = {}

    def run_of(step):
        if step.name not in runs:
            out, printed = tmp_path_factory.mktemp(f"interrupted-{step.name}"), io.StringIO()
            with pytest.MonkeyPatch.context() as m, contextlib.redirect_stdout(printed), \
                    contextlib.redirect_stderr(printed), pytest.raises(SystemExit) as exit:
                interrupt_after(3, m)
                run(step, out, *SIX)
            runs[step.name] = out, exit.value.code, printed.getvalue()
        return runs[step.name]

    return run_of


@pytest.mark.main_needs("Loader")
def test_ctrl_c_stops_after_the_iteration_it_came_in_exits_130_and_says_how_to_resume(step, interrupted):
    stopped, code, said = interrupted(step)  # Ctrl-C as iteration 3 is logged
    assert code == 130  # 128 + SIGINT, as a shell reports Ctrl-C
    assert "interrupted: 4 iterations done" in said and f"--resume {stopped}" in said
    assert len(metrics(stopped)[0]) == 4


@pytest.mark.main_needs("Loader")
def test_a_run_stopped_by_ctrl_c_and_resumed_logs_the_losses_of_one_run(step, tmp_path, interrupted):
    whole = run(step, tmp_path / "whole", *SIX)
    stopped, _, _ = interrupted(step)
    shutil.copytree(stopped, tmp_path / "split")  # resumed in a copy: the stopped run stays for the next test
    resumed = run(step, tmp_path / "split", *SIX, "--resume", str(tmp_path / "split"))
    assert resumed == whole  # every training loss and every validation loss, digit for digit


@pytest.mark.main_needs("Loader")
def test_ctrl_c_leaves_the_loss_curve_so_far_and_a_summary_marked_interrupted(step, interrupted):
    stopped, _, said = interrupted(step)
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["interrupted"]["iters_done"] == 4 and f"--resume {stopped}" in summary["interrupted"]["resume"]
    # the last one; metrics.jsonl rounds to 6 decimals, off by 5e-7 at most (4.97e-7 measured)
    assert abs(summary["val_loss"] - metrics(stopped)[1][-1][1]) <= 1e-6
    assert "validation" in (stopped / "loss.svg").read_text()
    assert f"loss curve: {stopped / 'loss.svg'}" in said


@pytest.mark.main_needs("Loader")
@pytest.mark.first_and_last  # the handler is the same code in every trainer (make diff)
def test_a_second_ctrl_c_stops_at_once_and_says_the_checkpoint_saved_before_stays(step, tmp_path, monkeypatch, capsys):
    log = runlog.RunLog.log

    def log_then_two_ctrl_cs(self, it, *args, **kwargs):
        log(self, it, *args, **kwargs)
        if it == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(runlog.RunLog, "log", log_then_two_ctrl_cs)
    with pytest.raises(KeyboardInterrupt):
        run(step, tmp_path, *SIX, "--save-every", "2")
    said = capsys.readouterr().err
    assert "Ctrl-C again: stopping now, saving nothing (a checkpoint saved before stays whole)" in said
    assert checkpoint.load(tmp_path)["iter"] == 2  # saved after iterations 0 and 1; iteration 3's save never came


# A real terminal, a real process: run on the first trainer and the newest (the signal handling is the same code in
# every trainer, as make diff shows; the in-process test above runs on each of them).
@pytest.mark.main_needs("Loader")
@pytest.mark.first_and_last
def test_ctrl_c_in_a_terminal_saves_a_checkpoint_and_prints_how_to_resume(step, tmp_path):
    cmd = [sys.executable, "-m", f"steps.{step.name}", *RUN, *small_run_flags(step), "--max-steps", "100000",
           "--log-every", "1", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait for the first logged iteration
        if line.startswith("iter "):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err  # 128 + SIGINT, as a shell reports Ctrl-C
    assert f"--resume {tmp_path}" in err
    state = torch.load(tmp_path / checkpoint.NAME, weights_only=True)
    assert state["iter"] >= 1 and state["config"]["step"] == step.name


@pytest.mark.main_needs("Loader")
def test_the_resume_command_pasted_into_bash_gives_make_back_every_word(step, tmp_path):
    argv = ["--out", "runs/it's here", "--note", 'He said "no"', "--cost", "$5 $(HOME) $$ `ls` \\", "--wow", "Hi!",
            "--resume", "old"]
    command = step.main.resume_command(argv, Path("runs/a b"))
    args_lines = [line for line in (ROOT / "Makefile").read_text().splitlines()
                  if line.startswith(("override ARGS :=", "export ARGS", "ARGV ="))]
    assert len(args_lines) == 3
    (tmp_path / "Makefile").write_text("SHELL := /bin/bash\n" + "\n".join(args_lines) +
                                       '\nwords:\n\t@$(ARGV); printf "%s\\0" "$$@"\n')
    pasted = command.replace(f"make step N={step.name[:2]}", f"make -s -C {tmp_path} words", 1)
    said = subprocess.run(["bash"], input=f"set -o history -o histexpand\n{pasted}\n",  # ! as a terminal's bash
                          capture_output=True, text=True)
    assert said.stdout.split("\0")[:-1] == [*argv[:-2], "--resume", "runs/a b"], said.stderr


@pytest.mark.main_needs("Loader")
def test_a_new_run_does_not_overwrite_an_earlier_runs_checkpoint(step, tmp_path, finished):
    finished(step, tmp_path)
    before = (tmp_path / checkpoint.NAME).read_bytes()
    with pytest.raises(SystemExit) as exit:
        run(step, tmp_path, "--max-steps", "2")
    assert f"{tmp_path} holds a finished run" in str(exit.value.code) and "--out" in str(exit.value.code)
    assert "--resume" not in str(exit.value.code)  # it would answer "nothing to resume": no advice in a circle
    assert (tmp_path / checkpoint.NAME).read_bytes() == before


@pytest.mark.main_needs("Loader")
@pytest.mark.first_and_last  # RunLog's second check (shared/runlog.py), reached by the same call in every trainer
def test_a_run_that_ends_while_a_new_one_builds_its_model_keeps_its_checkpoint_and_metrics(step, tmp_path, finished,
                                                                                            monkeypatch):
    finished.made(step)  # now: made in the hook, inside the new run's size check, it would build on meta
    build = step.main.GPT

    def build_while_an_earlier_run_ends(config):  # after the new run's first check, before it takes the directory
        finished(step, tmp_path)
        return build(config)

    monkeypatch.setattr(step.main, "GPT", build_while_an_earlier_run_ends)
    with pytest.raises(SystemExit) as exit:
        run(step, tmp_path, "--max-steps", "2")
    assert "holds a finished run" in str(exit.value.code)
    assert checkpoint.load(tmp_path)["iter"] == 3 and len(metrics(tmp_path)[0]) == 3  # the earlier run's, whole


@pytest.mark.main_needs("Loader")
@pytest.mark.first_and_last  # runlog.refuse_if_running, which every trainer calls alike
def test_a_run_into_a_directory_another_run_is_writing_to_stops_before_it_builds_its_model(step, tmp_path, capsys):
    other = runlog.RunLog(tmp_path, total=10)  # a run started a moment earlier, not yet at its first checkpoint
    other.log(0, 2.5, 0.5)
    with pytest.raises(SystemExit) as exit:
        run(step, tmp_path, "--max-steps", "2")
    assert str(exit.value.code).startswith(f"error: another run is writing to {tmp_path} now")
    assert " parameters (" not in capsys.readouterr().out  # printed once the model is built, before shapes, compile
    assert len(metrics(tmp_path)[0]) == 1 and not (tmp_path / checkpoint.NAME).exists()  # the other run's, untouched
    other.close()


@pytest.mark.main_needs("Loader")
@pytest.mark.first_and_last  # runlog.refuse_if_running, before the checkpoint is looked for, in every trainer
@pytest.mark.parametrize("which", ["a resume before its first checkpoint", "a new run after it"])
def test_a_run_into_a_run_still_going_is_told_that_it_is_running_not_about_its_checkpoint(step, tmp_path, which):
    other = runlog.RunLog(tmp_path, total=10)  # was: "no checkpoint to resume from"; after the first checkpoint,
    if which == "a new run after it":  # "continue it with --resume", which would be refused for the same reason
        checkpoint.save(tmp_path, a_state(1))
    with pytest.raises(SystemExit) as exit:
        run(step, tmp_path, "--max-steps", "2", *(["--resume", str(tmp_path)] if which.startswith("a resume") else []))
    assert str(exit.value.code).startswith(f"error: another run is writing to {tmp_path} now")
    other.close()


@pytest.mark.main_needs("Loader")
def test_resuming_with_another_config_says_what_differs(step, tmp_path, finished):
    finished(step, tmp_path)  # --lr 1e-3
    with pytest.raises(SystemExit) as exit:
        run(step, tmp_path, "--max-steps", "3", "--lr", "2e-3", "--resume", str(tmp_path))
    message = str(exit.value.code)
    assert "saved with other settings than these" in message and "lr: 0.001 in the checkpoint, 0.002 now" in message


@pytest.mark.main_needs("Loader")
@pytest.mark.parametrize("out", ["elsewhere", "default"])  # "default": the default's path, given: given all the same
def test_resume_with_an_out_of_its_own_is_refused_not_ignored(step, tmp_path, capsys, monkeypatch, out):
    monkeypatch.chdir(tmp_path)  # runs/<step>, the default --out, is then under tmp_path
    (tmp_path / "earlier").mkdir()
    out = "elsewhere" if out == "elsewhere" else f"runs/{step.name}"
    with pytest.raises(SystemExit) as exit:
        run(step, out, "--resume", "earlier")
    assert exit.value.code == 2 and (f"--out {out} with --resume earlier: a resumed run goes on in the directory it "
                                     "resumes") in capsys.readouterr().err


@pytest.mark.main_needs("Loader")
def test_resuming_a_stopped_run_with_other_flags_shows_the_command_its_ctrl_c_printed(step, interrupted):
    stopped, _, _ = interrupted(step)
    with pytest.raises(SystemExit) as exit:
        run(step, stopped, "--resume", str(stopped))  # without SIX: another --max-steps and --dropout
    go_on = json.loads((stopped / "summary.json").read_text())["interrupted"]["resume"]
    message = str(exit.value.code)
    assert message.endswith(f"\nIts Ctrl-C printed that command:\n  {go_on}")
    assert "\n  max_steps: 6 in the checkpoint" in message


@pytest.mark.main_needs("Loader")
def test_resuming_another_steps_checkpoint_is_refused(step, tmp_path, finished):
    finished(step, tmp_path)
    state = torch.load(tmp_path / checkpoint.NAME, weights_only=True)
    state["config"]["step"] = "00_elsewhere"
    torch.save(state, tmp_path / checkpoint.NAME)
    with pytest.raises(SystemExit) as exit:
        run(step, tmp_path, "--max-steps", "3", "--lr", "1e-3", "--resume", str(tmp_path))
    assert f"step: '00_elsewhere' in the checkpoint, '{step.name}' now" in str(exit.value.code)


@pytest.mark.main_needs("Loader")
def test_a_checkpoint_that_does_not_fit_is_refused_before_any_work(step, tmp_path, finished, monkeypatch, capsys):
    finished(step, tmp_path)
    monkeypatch.setattr(step.main, "GPT", lambda config: pytest.fail("the model was built before the refusal"))
    with pytest.raises(SystemExit) as exit:
        run(step, tmp_path, "--max-steps", "3", "--lr", "2e-3", "--resume", str(tmp_path))
    assert "was saved with other settings than these" in str(exit.value.code)
    assert f"step {step.name} on" not in capsys.readouterr().out  # no header, no shapes: refused before the model


@pytest.mark.main_needs("Loader")
@pytest.mark.first_and_last  # shared/checkpoint.py's load and check, which every trainer calls alike
@pytest.mark.parametrize("damage, said", [
    ("truncated", "cut short: the write that made it did not finish"),
    ("not a checkpoint", "not the zip archive that torch.save writes"),
    ("no checkpoint", "no checkpoint to resume from"),
    ("a pickled object", "weights_only=True builds none"),
    ("not a dict", "not a dict of the run's state"),
    ("no iter", "(no iter of the right kind)"),
    ("a config that is not a dict", "(no config of the right kind)"),
    ("no cpu rng", "its rng or optimizer is not as a step saves it"),
    ("no param groups", "its rng or optimizer is not as a step saves it"),
    ("an rng state of floats", "its rng or optimizer is not as a step saves it"),
    ("a nan weight", "has nan or inf in"),
    ("an inf weight", "has nan or inf in"),
    ("a negative loader position", "a step saves neither below 0"),
    ("a weight missing", "does not fit this run"),  # these four pass torch.load and the checks of checkpoint.load
    ("a weight of another shape", "does not fit this run"),
    ("an empty list of param groups", "does not fit this run"),
    ("an rng state cut short", "does not fit this run"),
    ("a param group without its params", "does not fit this run"),  # a KeyError in torch's load_state_dict
    ("a param group that is not a dict", "does not fit this run")])  # a TypeError there
def test_a_damaged_checkpoint_gets_one_line_that_says_what_is_wrong_not_a_traceback(step, tmp_path, damage, said,
                                                                                     finished):
    finished(step, tmp_path)
    path = tmp_path / checkpoint.NAME
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "not a checkpoint":
        path.write_text("hello")
    elif damage == "no checkpoint":
        path.unlink()
    elif damage == "a pickled object":  # weights_only=True refuses to build objects: loading cannot run its code
        torch.save({"config": {}, "hook": subprocess.Popen}, path)
    elif damage == "not a dict":
        torch.save([1, 2], path)
    elif damage in ("a nan weight", "an inf weight"):  # a bit flipped on disk, or a run's state edited by hand
        state = torch.load(path, weights_only=True)
        next(iter(state["model"].values()))[0] = float("nan" if damage == "a nan weight" else "inf")
        torch.save(state, path)
    else:  # readable, but not what a step saves
        state = torch.load(path, weights_only=True) | {"iter": 1}  # one iteration of 3 done: there is work to resume
        if damage == "no iter":
            del state["iter"]
        elif damage == "a config that is not a dict":
            state["config"] = "x"
        elif damage == "no cpu rng":
            del state["rng"]["cpu"]
        elif damage == "a negative loader position":
            state["loader"] = -10**9
        elif damage == "an rng state of floats":
            state["rng"]["cpu"] = state["rng"]["cpu"].float()
        elif damage == "a weight missing":
            del state["model"]["transformer.wte.weight"]
        elif damage == "a weight of another shape":
            state["model"]["transformer.wte.weight"] = state["model"]["transformer.wte.weight"][:-1]
        elif damage == "an empty list of param groups":
            state["optimizer"]["param_groups"] = []
        elif damage == "an rng state cut short":
            state["rng"]["cpu"] = state["rng"]["cpu"][:100]
        elif damage == "a param group without its params":
            del state["optimizer"]["param_groups"][0]["params"]
        elif damage == "a param group that is not a dict":
            state["optimizer"]["param_groups"][0] = 7
        else:
            del state["optimizer"]["param_groups"]
        torch.save(state, path)
    with pytest.raises(SystemExit) as exit:  # the finished run's own command, resumed
        run(step, tmp_path, "--max-steps", "3", "--eval-every", "2", "--lr", "1e-3", "--resume", str(tmp_path))
    assert str(exit.value.code).startswith("error: ") and str(path) in str(exit.value.code)
    assert said in str(exit.value.code) and "\n" not in str(exit.value.code)


@pytest.mark.main_needs("Loader")
@pytest.mark.first_and_last  # the same lines in every trainer (make diff)
def test_a_model_directory_that_cannot_be_written_stops_in_one_line_and_keeps_the_checkpoint(step, tmp_path):
    (tmp_path / "model").write_text("a file where model/ goes")
    with pytest.raises(SystemExit) as exit:
        run(step, tmp_path, "--max-steps", "2")
    assert str(exit.value.code) == (f"error: cannot write {tmp_path / 'model'} (File exists); "
                                    f"{tmp_path / checkpoint.NAME} holds the trained weights")
    assert checkpoint.load(tmp_path)["iter"] == 2


@pytest.mark.main_needs("Loader")
@pytest.mark.first_and_last  # the same lines in every trainer (make diff)
def test_a_model_directory_on_a_full_disk_stops_in_one_line_and_leaves_no_half_written_file(step, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors.tmp").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(SystemExit) as exit:
        run(step, tmp_path, "--max-steps", "2")
    assert str(exit.value.code) == (f"error: cannot write {tmp_path / 'model'} (No space left on device); "
                                    f"{tmp_path / checkpoint.NAME} holds the trained weights")
    assert list((tmp_path / "model").iterdir()) == []  # config.json.tmp, written before, is gone too


@pytest.mark.main_needs("Loader")
@pytest.mark.first_and_last  # the same lines in every trainer (make diff)
def test_a_ctrl_c_while_the_model_directory_is_written_leaves_no_half_written_file(step, tmp_path, monkeypatch):
    def half_then_ctrl_c(self, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "model.safetensors.tmp").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(step.main.GPT, "save_pretrained", half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run(step, tmp_path, "--max-steps", "2")
    assert list((tmp_path / "model").iterdir()) == [] and checkpoint.load(tmp_path)["iter"] == 2


def a_state(n: int) -> dict:
    return {"config": {"n": n}, "iter": n, "model": {}, "optimizer": {"state": {}, "param_groups": []}, "loader": 0,
            "rng": {"cpu": torch.get_rng_state(), "cuda": []}}


def test_a_pickle_not_written_by_torch_is_refused_in_one_line_without_torchs_warning(tmp_path, recwarn):
    (tmp_path / checkpoint.NAME).write_bytes(pickle.dumps({"config": {}}, protocol=4))  # torch.save writes 2
    with pytest.raises(SystemExit) as exit:
        checkpoint.load(tmp_path)
    assert str(exit.value.code).startswith(f"error: {tmp_path / checkpoint.NAME} is not a readable checkpoint")
    assert [str(w.message) for w in recwarn] == []  # torch's "Detected pickle protocol 4" would come before the line


@pytest.mark.parametrize("damage, why", [
    ("a text file", "not the zip archive that torch.save writes"),
    ("cut short", "cut short: the write that made it did not finish"),
    ("a pickled object",
     "damaged, or it holds objects other than tensors and plain data: weights_only=True builds none"),
    ("a directory", "Is a directory"),
])
def test_an_unreadable_checkpoint_is_refused_with_why(tmp_path, damage, why):
    path = tmp_path / checkpoint.NAME
    if damage == "a text file":
        path.write_text("hello")
    elif damage == "cut short":
        checkpoint.save(tmp_path, a_state(1))
        path.write_bytes(path.read_bytes()[:1000])  # the zip archive's index, at its end, is gone
    elif damage == "a directory":
        path.mkdir()
    else:
        torch.save({"config": {}, "hook": subprocess.Popen}, path)
    with pytest.raises(SystemExit) as exit:
        checkpoint.load(tmp_path)
    assert str(exit.value.code) == (f"error: {path} is not a readable checkpoint ({why}). Delete it, or start the run "
                                    "afresh with another --out.")


def test_a_checkpoint_is_never_left_half_written(tmp_path):
    checkpoint.save(tmp_path, a_state(1))
    (tmp_path / f"{checkpoint.NAME}.tmp").symlink_to("/dev/full")  # a full disk: every write fails with ENOSPC
    with pytest.raises(SystemExit) as exit:
        checkpoint.save(tmp_path, a_state(2))
    assert str(exit.value.code) == (f"error: cannot write a checkpoint to {tmp_path} (No space left on device); "
                                    f"{tmp_path / checkpoint.NAME} is the last one written")
    assert checkpoint.load(tmp_path)["config"] == {"n": 1} and not (tmp_path / f"{checkpoint.NAME}.tmp").exists()


def test_a_checkpoint_write_that_fails_part_way_stops_in_one_line_and_leaves_no_half_written_file(
        tmp_path, files_of_at_most_100_kb):
    # torch.save's zip writer meets the failed write, then raises a RuntimeError of its own as it closes the file
    with pytest.raises(SystemExit) as exit:
        checkpoint.save(tmp_path, a_state(1) | {"model": {"w": torch.zeros(100_000)}})  # 400 kB
    assert str(exit.value.code) == f"error: cannot write a checkpoint to {tmp_path} (File too large)"
    assert list(tmp_path.iterdir()) == []


def ctrl_c_as_torch_save_meets_it(state, f):  # measured: torch.save's zip writer, closed by the KeyboardInterrupt,
    f.write(b"PK half a zip")  # raises a RuntimeError of its own ("unexpected pos"), whose __context__ is the Ctrl-C
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 28964992 vs 28964884")


def ctrl_c_between_two_writes(state, f):
    f.write(b"PK half a zip")
    raise KeyboardInterrupt


@pytest.mark.parametrize("write", [ctrl_c_as_torch_save_meets_it, ctrl_c_between_two_writes])
def test_a_ctrl_c_in_the_middle_of_a_checkpoint_write_leaves_the_last_one_and_no_half_written_file(tmp_path,
                                                                                                    monkeypatch, write):
    checkpoint.save(tmp_path, a_state(1))
    monkeypatch.setattr(checkpoint.torch, "save", write)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, a_state(2))
    assert checkpoint.load(tmp_path)["config"] == {"n": 1}
    assert sorted(tmp_path.iterdir()) == [tmp_path / checkpoint.NAME]  # no checkpoint.pt.tmp


@pytest.mark.main_needs("Loader")
def test_a_diverging_run_keeps_its_last_good_checkpoint(step, tmp_path):
    with pytest.raises(SystemExit):
        run(step, tmp_path, "--max-steps", "20", "--lr", "1e9", "--save-every", "1")
    losses, _ = metrics(tmp_path)
    state = torch.load(tmp_path / checkpoint.NAME, weights_only=True)
    assert losses[-1][1] is None and state["iter"] == len(losses) - 1  # saved after the last finite loss
    assert all(torch.isfinite(v).all() for v in state["model"].values())


# ---- the trained model, for everyone else

@pytest.mark.needs("GPT.save_pretrained")
@pytest.mark.per_model_file
def test_save_pretrained_gives_a_directory_transformers_loads_with_the_same_logits(step, tmp_path):
    torch.manual_seed(0)
    model = step.model.GPT(step.model.GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()
    with torch.no_grad():  # std 0.2, as tests/test_gpt2.py's INIT: at GPT-2's 0.02 a config.json that said the exact
        for p in model.parameters():  # "gelu" would give logits 3e-6 from ours, inside the tolerance
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(50257, (2, 16))
    with torch.no_grad():  # fp32, the same weights: only the order of float sums differs (4.8e-7 measured)
        torch.testing.assert_close(hf(idx).logits[..., :50257], model(idx)[0][..., :50257], atol=1e-5, rtol=0)


@pytest.mark.needs("GPT.save_pretrained")
@pytest.mark.per_model_file
def test_save_pretrained_files_are_readable_as_the_umask_allows(step, tmp_path):
    model = step.model.GPT(step.model.GPTConfig(block_size=8, vocab_size=100, n_layer=1, n_head=1, n_embd=8))
    umask = os.umask(0o022)  # the usual one: the owner writes, everyone reads
    try:
        model.save_pretrained(tmp_path)
    finally:
        os.umask(umask)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in tmp_path.iterdir()} == {
        "config.json": "0o644", "model.safetensors": "0o644"}  # safetensors' save_file would give 0o600


@pytest.mark.main_needs("Loader")
def test_tokens_per_second_are_the_tokens_of_an_optimizer_step_over_its_time(step, tmp_path, finished):
    rows = [json.loads(line) for line in (finished(step, tmp_path) / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]
    flags = dict(zip(small_run_flags(step)[::2], small_run_flags(step)[1::2]))  # flag: value
    tokens = int(flags.get("--total-batch-size", int(flags["--batch-size"]) * int(flags["--seq-len"])))
    assert len(rows) == 3
    for r in rows:  # tok/s is rounded to a whole number (off by up to 0.5 x seconds tokens), ms to 0.01 ms (by up
        seconds = r["ms"] / 1000  # to 0.5e-5 s x tok/s), and the two errors' product is below 1e-5
        assert abs(r["tok_per_s"] * seconds - tokens) <= 0.5 * seconds + 0.5e-5 * r["tok_per_s"] + 1e-5


@pytest.mark.main_needs("Loader")
def test_a_finished_run_leaves_metrics_a_checkpoint_the_model_and_a_curve_of_both_losses(step, tmp_path, finished):
    finished(step, tmp_path)
    written = {p.name for p in tmp_path.iterdir()}
    assert {"metrics.jsonl", "summary.json", "loss.svg", checkpoint.NAME, "model"} <= written
    assert "validation" in (tmp_path / "loss.svg").read_text()  # both curves in the picture


@pytest.mark.main_needs("Loader")
def test_a_finished_runs_metrics_have_every_iteration_and_every_evaluation(step, tmp_path, finished):
    losses, vals = metrics(finished(step, tmp_path))  # --max-steps 3 --eval-every 2: the last iteration evaluates too
    assert [i for i, _ in losses] == [0, 1, 2] and [i for i, _ in vals] == [1, 2]


@pytest.mark.main_needs("Loader")
def test_a_finished_run_prints_its_preset_and_a_sample(step, finished):
    finished.made(step)
    assert "preset tiny" in finished.printed[step.name] and "ROMEO:" in finished.printed[step.name]  # header, sample


@pytest.mark.first_and_last
@pytest.mark.main_mentions("a step of {args.total_batch_size:,} tokens is")
def test_a_step_of_more_tokens_than_the_data_says_so_before_its_long_first_iteration(step, tmp_path, capsys,
                                                                                     monkeypatch):
    from shared import data

    corpus = data.shakespeare()  # the fixture's twentieth of tiny shakespeare; a fifth: about 3,000 training tokens
    monkeypatch.setattr(data, "shakespeare", lambda: corpus[: len(corpus) // 5])
    run(step, tmp_path, "--max-steps", "1", "--total-batch-size", "4096")  # 64 micro-batches of 2 x 32
    note = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("note: a step of"))
    assert re.fullmatch(r"note: a step of 4,096 tokens is 1\.\dx the training tokens, and its first log line comes "
                        r"after all 64 micro-batches; a smaller --total-batch-size \(a multiple of 64\) makes it "
                        r"shorter", note), note


@pytest.mark.main_needs("Loader")
def test_step_09_writes_with_the_trained_model(step, tmp_path, capsys, finished):
    finished(step, tmp_path)
    generate = importlib.import_module("steps.09_from_pretrained.__main__")
    generate.main(["--model", str(tmp_path / "model"), "--prompt", "ROMEO:", "--max-new-tokens", "3",
                   "--num-samples", "1", "--device", "cpu"])
    out, header = capsys.readouterr().out, f"step 09_from_pretrained on cpu: {tmp_path / 'model'}"
    assert header in out
    after_the_prompt = out.split(header, 1)[1].split("ROMEO:", 1)
    assert len(after_the_prompt) == 2 and after_the_prompt[1].strip("-\n")  # the prompt, then what the model wrote


@pytest.mark.main_needs("Loader")
def test_resuming_a_finished_run_changes_nothing(step, tmp_path, finished, capsys):
    finished(step, tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in ("summary.json", checkpoint.NAME, "metrics.jsonl")}
    run(step, tmp_path, "--max-steps", "3", "--lr", "1e-3", "--resume", str(tmp_path))
    assert "holds a finished run (3 of 3 iterations): nothing to resume" in capsys.readouterr().out
    assert all((tmp_path / f).read_bytes() == b for f, b in before.items())


@pytest.mark.main_needs("Loader")
def test_resume_from_a_directory_that_is_not_there_makes_none(step, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(step, tmp_path / "run", "--resume", str(tmp_path / "typo"))
    assert "typo does not exist" in capsys.readouterr().err and not (tmp_path / "typo").exists()


@pytest.mark.main_needs("Loader")
def test_resume_given_the_checkpoint_file_names_the_directory_to_give(step, tmp_path, finished, capsys):
    finished(step, tmp_path)
    with pytest.raises(SystemExit):
        run(step, tmp_path / "run", "--resume", str(tmp_path / checkpoint.NAME))
    assert f"is a file, not a directory: give the directory that holds it, {tmp_path}" in capsys.readouterr().err


# Flags a run's numbers depend on, with another value than the finished run's: (flag, value, the run's key).
# --warmup-steps: the finished run's is 1 (3 // 10, at least 1). --dtype: the other one than the run's.
OTHER_VALUES = [("--dtype", None, "dtype"), ("--warmup-steps", "2", "warmup_steps"),
                ("--total-batch-size", "256", "total_batch_size"), ("--no-shuffle", None, "shuffle")]


@pytest.mark.main_needs("Loader")
@pytest.mark.main_mentions('"--dtype"')  # the first flag of OTHER_VALUES to come (step 11); each is tried where it is
def test_resuming_with_another_value_of_any_flag_the_run_depends_on_is_refused(step, tmp_path, finished):
    finished(step, tmp_path)  # --max-steps 3 --eval-every 2 --lr 1e-3
    dtype = checkpoint.load(tmp_path)["config"]["dtype"]
    tried = []
    for flag, value, key in OTHER_VALUES:
        if not mentions(step, f'"{flag.replace("--no-", "--")}"'):  # a flag of a later step
            continue
        value = {"fp32": "bf16", "bf16": "fp32"}[dtype] if flag == "--dtype" else value
        with pytest.raises(SystemExit) as exit:
            run(step, tmp_path, "--max-steps", "3", "--eval-every", "2", "--lr", "1e-3", flag,
                *([value] if value else []), "--resume", str(tmp_path))
        said = str(exit.value.code)
        assert "saved with other settings than these" in said and f"\n  {key}: " in said, flag
        tried.append(flag)
    assert tried  # --dtype at least


@pytest.mark.main_needs("Loader")
def test_training_starts_at_the_first_batch_and_reads_the_batches_in_turn(step, tmp_path, monkeypatch):
    # Before training, the header's shapes (and from step 12 the compile's try) read a batch: the loader is put back
    # to 0 after them, or the run would start at its second batch.
    positions, next_batch = [], step.main.Loader.next_batch

    def recording(self):
        positions.append(self.pos)
        return next_batch(self)
    monkeypatch.setattr(step.main.Loader, "next_batch", recording)
    run(step, tmp_path, "--max-steps", "2", "--save-every", "100", "--eval-every", "100")
    micro_steps = 2 if "--total-batch-size" in small_run_flags(step) else 1  # 128 tokens in micro-batches of 2 x 32
    trained = positions[-2 * micro_steps:]  # the 2 iterations' batches: the last ones read
    stride = trained[1] - trained[0]
    assert trained[0] == 0 and stride > 0 and trained == [k * stride for k in range(len(trained))], positions


@pytest.mark.main_needs("Loader")
@pytest.mark.main_lacks("lr_at")  # step 14 brings clipping to 1.0 (test_gpt3_hparams.py)
def test_before_step_14_the_gradient_norm_is_measured_not_clipped(step, tmp_path):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []  # the norm of all the gradients as each optimizer step begins
    hook = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for g in opt.param_groups for p in g["params"] if p.grad is not None])).item()))
    try:
        run(step, tmp_path, "--max-steps", "3", *(["--dtype", "fp32"] if mentions(step, '"--dtype"') else []))
    finally:
        hook.remove()
    logged = [json.loads(line)["grad_norm"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert max(logged) > 1.05  # a clip to 1.0 would show (2.0-2.35 measured)
    # fp32: the same norm computed twice, in another order of its sums (equal as measured); 1e-5 is about a hundred
    # float32 rounding steps, far below what a clip to 1.0 would make (50% here, 5% at the least the assert allows)
    assert seen == pytest.approx(logged, rel=1e-5)
