"""The project's helpers: the step registry behind the Makefile, data files, tokenizers, device, run log."""
import argparse
import contextlib
import fcntl
import http.client
import importlib
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.run
from torch.distributed.elastic.multiprocessing.api import SignalException

from shared import checkpoint, cli, curves, data, device, launch, runlog, shapes
from shared.steps import ROOT, all_steps, resolve
from tests.conftest import MAKE_VARIABLES, data_dir_copy


def sh(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def test_a_step_is_named_by_number_padded_number_or_full_name():
    assert resolve("1") == resolve("01") == resolve("01_embedding") == "01_embedding"


def test_unknown_step_prints_the_list_and_exits_nonzero():
    for n in ("99", "", "embedding", "²", "٨"):  # digits to str.isdigit, not to int() or a learner
        r = sh(sys.executable, "-m", "shared.steps", "resolve", n)
        assert r.returncode == 2 and "01_embedding" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("n, said", [("99", "error: unknown step '99'. The steps are:"),
                                     ("", "error: no step given (use N=08). The steps are:")])
def test_an_unknown_step_and_no_step_at_all_are_told_apart(n, said):
    assert sh(sys.executable, "-m", "shared.steps", "resolve", n).stderr.startswith(said)


def pinned() -> list[str]:
    """pyproject.toml's dependencies, as written there (each pinned with ==)."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def test_the_step_registry_lists_every_pinned_dependency_for_make_to_install():
    assert sh(sys.executable, "-m", "shared.steps", "deps").stdout.split() == pinned()


def test_the_step_registry_lists_only_the_dependencies_it_is_asked_for():
    # make setup CPU=1 installs torch alone first, from PyTorch's CPU index (PyPI's would pull CUDA's packages)
    torch_pin = [d for d in pinned() if d.startswith("torch==")]
    assert len(torch_pin) == 1 and sh(sys.executable, "-m", "shared.steps", "deps", "torch").stdout.split() == torch_pin


def test_what_a_step_brought_of_an_unknown_step_is_an_error():
    r = sh(sys.executable, "-m", "shared.steps", "brought", "99")
    assert r.returncode == 2 and r.stderr == "error: unknown step '99'\n"


def test_make_list_shows_every_step_with_its_lesson():
    out = sh("make", "-s", "list").stdout
    assert all(s in out for s in all_steps()) and "sqrt(d_model)" in out


def test_make_help_lists_every_target_of_the_makefile():
    out = sh("make", "-s", "help").stdout
    phony = re.search(r"^TARGETS := (.*)$", (ROOT / "Makefile").read_text(), re.M)[1].split()  # .PHONY's
    assert all(f"make {target}" in out for target in phony if target != "clean"), out


def test_a_word_of_args_left_outside_its_quotes_stops_make_before_the_step_runs():
    r = sh("make", "-s", "step", "N=01", "ARGS=--max-steps", "10")  # as typed: make step N=01 ARGS=--max-steps 10
    assert r.returncode == 2 and r.stdout == ""
    assert '"10" is not a target (make help lists them); if it is a word of ARGS, put ARGS in quotes' in r.stderr


@pytest.mark.parametrize("goal", [["diff", "N=03"], ["list"], [], ["help"]], ids=["diff", "list", "default", "help"])
@pytest.mark.parametrize("args", ["--help", "--bogus"])
def test_args_given_to_a_command_that_takes_none_is_said_not_dropped(goal, args):
    r = sh("make", "-s", *goal, f"ARGS={args}")  # make diff N=03 ARGS=--bogus once showed the diff as if all was well
    assert r.returncode == 2 and r.stdout == ""
    assert f"make {goal[0] if goal else 'list'} takes no ARGS (make help says what each command does)" in r.stderr


def test_args_exported_in_the_shell_for_the_steps_leave_make_list_and_diff_alone():
    env = {**os.environ, "ARGS": "--device cpu"}  # export ARGS="--device cpu", then make step N=.. a few times
    for goal in (["list"], ["diff", "N=03"]):
        r = subprocess.run(["make", "-s", *goal], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0 and "takes no ARGS" not in r.stderr and r.stdout, r.stderr


def words_of(cmdline: Path) -> list[bytes]:
    """A process's command line, word by word; none for a process gone meanwhile."""
    try:
        return cmdline.read_bytes().split(b"\0")
    except OSError:
        return []


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the run's process in Linux's /proc")
def test_a_run_killed_by_the_kernel_is_explained_by_make_step(tmp_path):
    # the out-of-memory killer sends SIGKILL: the run can say nothing, so make says what exit 137 most often means
    proc = subprocess.Popen(["make", "-s", "step", "N=01", f"ARGS=--max-steps 100000 --out {tmp_path / 'run'}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # a group of its own: nothing of it outlives the test
    try:
        for line in proc.stdout:
            if line.startswith("iter"):  # training: the run is the python process whose command line names its --out
                break
        run = next((int(p.parent.name) for p in Path("/proc").glob("[0-9]*/cmdline")
                    if {b"steps.01_embedding", str(tmp_path / "run").encode()} <= set(words_of(p))), None)
        assert run is not None, "the run's process was not found"
        os.kill(run, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 2  # make's own: its recipe failed (with 137)
    assert "make step: the run was killed (SIGKILL, exit 137), most often by the kernel when memory runs out" in err


def test_the_makes_a_test_starts_see_none_of_make_tests_own_variables():
    # under `make test N=03`, a make started with N=03 in its environment would run step 03 (or refuse, as
    # `make mistake N=03 ARGS=` did): conftest.py takes them out
    assert not set(MAKE_VARIABLES) & set(os.environ)


@pytest.mark.parametrize("args, said", [
    ("--prompt 'I'm here'", "error: ARGS has a quote that is not closed: --prompt 'I'm here'\n"
                            r'''An apostrophe ends a value quoted with '...': quote such a value with \"...\", '''
                            r'''as in ARGS="--prompt \"I'm here\""'''),
    ('--prompt "say hi', 'error: ARGS has a quote that is not closed: --prompt "say hi'),
    ("--prompt :)", "error: the shell cannot read ARGS: --prompt :)\nA value with ( ) ; & | < or > in it goes in "
                    "quotes, as in ARGS=\"--prompt 'Hi :)'\""),
])
def test_make_says_why_the_shell_cannot_read_args_in_its_own_words_not_the_recipes(args, said):
    r = subprocess.run(["make", "-s", "step", "N=09", f"ARGS={args}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith(said + "\n")  # then make's own "*** [step] Error 2"
    assert "elif" not in r.stderr  # ARGS pasted into the recipe took its text into argparse's error


def test_make_diff_shows_what_a_step_adds():
    r = sh("make", "-s", "diff", "N=02")
    assert r.returncode == 0 and "+def attention(" in r.stdout


def test_make_diff_shows_a_file_new_in_the_step_whole_as_added_lines():
    r = sh("make", "-s", "diff", "N=17")  # hellaswag.py: the benchmark, the other half of step 17's lesson
    new = (ROOT / "steps" / "17_fineweb_hellaswag" / "hellaswag.py").read_text().splitlines()
    assert r.returncode == 0 and "Only in" not in r.stdout
    assert all(f"+{line}" in r.stdout.splitlines() for line in new)


def test_make_diff_file_headers_name_the_files_without_their_times_or_diffs_options():
    out = sh("make", "-s", "diff", "N=17").stdout.splitlines()
    headers = [line for line in out if line.startswith(("---", "+++"))]
    assert "--- steps/16_ddp/__main__.py" in headers and "+++ steps/17_fineweb_hellaswag/__main__.py" in headers
    assert all("\t" not in line for line in headers)  # diff's times: when this clone wrote the file, not the lesson
    assert "diff -ruN steps/16_ddp/__main__.py steps/17_fineweb_hellaswag/__main__.py" in out


@pytest.mark.parametrize("command", ["make -s list | head -1", "make -s diff N=17 | head -1"])
def test_a_command_read_by_head_stops_quietly_when_head_has_enough(command):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as in a learner's terminal
    r = subprocess.run(f"set -o pipefail; {command}", shell=True, executable="/bin/bash", cwd=ROOT,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and r.stderr == ""  # no traceback, no make error


def test_make_diff_names_the_shared_code_the_step_is_the_first_to_import():
    r = sh("make", "-s", "diff", "N=17")  # make data's pipeline, shared/shards.py: half of step 17's lesson
    assert r.returncode == 0 and r.stdout.splitlines()[-1].startswith(
        "not in this diff: step 17 is the first to import shared/shards.py")
    assert "not in this diff" not in sh("make", "-s", "diff", "N=18").stdout


def test_make_diff_of_the_first_step_says_there_is_nothing_before_it_and_what_to_read_instead():
    r = sh("make", "-s", "diff", "N=1")
    assert r.returncode != 0 and "first step" in r.stderr
    assert "Read steps/01_embedding whole, and the modules of shared/ it imports: shared/cli.py," in r.stderr


def test_missing_data_file_offline_says_what_to_put_where(tmp_path, monkeypatch):
    data_dir_copy(tmp_path, monkeypatch, missing="tinyshakespeare.txt")
    with pytest.raises(SystemExit) as exit:
        data.shakespeare()
    message = str(exit.value.code)
    assert "tinyshakespeare.txt" in message and str(tmp_path) in message and "GPT2STEPS_DATA" in message


@pytest.mark.parametrize("env", [None, ""])  # GPT2STEPS_DATA= make ... sets it to ''
def test_the_data_directory_is_data_unless_gpt2steps_data_names_one(monkeypatch, env):
    monkeypatch.delenv("GPT2STEPS_DATA", raising=False) if env is None else monkeypatch.setenv("GPT2STEPS_DATA", env)
    assert data.data_dir() == Path("data")


def test_a_data_directory_that_is_missing_is_named_as_such(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path / "no-such-dir"))
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(SystemExit) as exit:
        data.shakespeare()
    assert str(exit.value.code).startswith(f"error: tinyshakespeare.txt is not in {tmp_path}/no-such-dir/ (no such "
                                           "directory) and could not be downloaded")


def test_a_data_directory_that_is_a_file_is_refused_before_any_download_with_where_the_files_go(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path / "a-file"))
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: pytest.fail("a download was tried"))
    with pytest.raises(SystemExit) as exit:
        data.shakespeare()
    assert str(exit.value.code) == (f"error: GPT2STEPS_DATA={tmp_path}/a-file is a file, not a directory: the data "
                                    "files (tinyshakespeare.txt, r50k_base.tiktoken) go in a directory; set "
                                    "GPT2STEPS_DATA to one, or leave it unset for data/")


class Response:
    """What urlopen returns, as a context manager; read() gives what `read` gives (or raises)."""

    def __init__(self, read):
        self.read = read

    def __enter__(self):
        return self

    def __exit__(self, *a):
        pass


def test_download_with_a_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path))
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: Response(lambda: b"not shakespeare"))
    with pytest.raises(SystemExit, match="checksum"):
        data.shakespeare()
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_a_download_cut_off_mid_file_is_refused_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path))

    def cut_off():  # what http.client raises when the connection ends before Content-Length
        raise http.client.IncompleteRead(b"First Citizen", 1115381)

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: Response(cut_off))
    with pytest.raises(SystemExit, match="could not be downloaded .*IncompleteRead"):
        data.shakespeare()
    assert not list(tmp_path.iterdir())


def test_a_download_that_cannot_be_saved_leaves_no_part_file(tmp_path, monkeypatch):
    blob = data.shakespeare().encode()  # the real file's bytes: its checksum passes
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path))
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: Response(lambda: blob))
    (tmp_path / f"tinyshakespeare.{os.getpid()}.part").symlink_to("/dev/full")  # a full disk: writes fail
    with pytest.raises(SystemExit, match=r"could not be downloaded \(\[Errno 28\] No space left on device"):
        data.shakespeare()
    assert not list(tmp_path.iterdir())


def test_a_download_makes_the_data_directory_when_there_is_none_and_saves_the_file_there(tmp_path, monkeypatch):
    blob = data.shakespeare().encode()  # the real file's bytes: its checksum passes
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path / "new" / "data"))  # as data/ in a fresh clone: not there yet
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: Response(lambda: blob))
    assert data.shakespeare().encode() == blob
    assert (tmp_path / "new" / "data" / "tinyshakespeare.txt").read_bytes() == blob


def test_a_data_file_that_cannot_be_read_is_said_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path))
    (tmp_path / "tinyshakespeare.txt").mkdir()  # there, but not a file
    with pytest.raises(SystemExit) as exit:
        data.shakespeare()
    assert str(exit.value.code) == f"error: cannot read {tmp_path / 'tinyshakespeare.txt'} (Is a directory)"


def test_gpt2_tokenizer_works_offline_with_gpt2_ids():
    enc = data.gpt2_tokenizer()
    assert enc.encode("Hello world") == [15496, 995] and enc.encode(" the") == [262]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


@pytest.mark.parametrize("name, load", [("tinyshakespeare.txt", data.shakespeare),
                                        ("r50k_base.tiktoken", data.gpt2_tokenizer)])
def test_a_damaged_data_file_is_named_with_what_to_do(tmp_path, monkeypatch, name, load):
    data_dir_copy(tmp_path, monkeypatch, damaged=name)
    with pytest.raises(SystemExit) as exit:
        load()
    message = str(exit.value.code)
    assert message.startswith("error:") and str(tmp_path / name) in message and "damaged" in message
    assert "Delete it" in message and data.FILES[name][0] in message  # how to get a good copy


def test_char_tokenizer_round_trips_with_specials_first():
    tok = data.CharTokenizer("hello", specials=("_",))
    assert tok.itos == ["_", "e", "h", "l", "o"] and tok.decode(tok.encode("hello")) == "hello"


def test_char_tokenizer_refuses_a_special_symbol_that_occurs_in_the_text():
    with pytest.raises(ValueError, match="also occur in the text"):
        data.CharTokenizer("why?", specials=("_", "?"))


def test_random_windows_targets_are_the_inputs_shifted_by_one():
    ids = torch.arange(100)
    x, y = data.random_windows(ids, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and torch.equal(y, x + 1)


def test_random_windows_can_reach_the_last_id():
    x, y = data.random_windows(torch.arange(9), 64, 8, torch.Generator().manual_seed(0))  # one window fits
    assert torch.equal(x, torch.arange(8).expand(64, 8)) and torch.equal(y, x + 1)


def test_sequential_windows_walk_every_full_window_in_order():
    batches = list(data.sequential_windows(torch.arange(30), batch_size=2, block_size=4))  # 7 windows of 4 + 1 id
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert [len(b[0]) for b in batches] == [2, 2, 2, 1]
    assert torch.equal(x.flatten(), torch.arange(28)) and torch.equal(y, x + 1)


def test_sequential_windows_of_a_whole_number_of_blocks_leave_out_the_last_one_whose_last_target_is_past_the_end():
    # 32 ids are 8 blocks of 4, but the 8th block's last target would be id 32: 7 windows (the char validation
    # split is 111,540 ids, a whole number of blocks at --block-size 10)
    batches = list(data.sequential_windows(torch.arange(32), batch_size=2, block_size=4))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(x.flatten(), torch.arange(28)) and torch.equal(y, x + 1)


def test_a_window_longer_than_a_split_is_refused_with_the_longest_that_fits():
    with pytest.raises(SystemExit) as exit:
        data.split(torch.arange(100), block_size=10)  # the validation split has 10 ids: 9 at most
    assert "--block-size 10 does not fit the validation split" in str(exit.value.code)
    assert "--block-size 9 or less" in str(exit.value.code)
    train, val = data.split(torch.arange(100), block_size=9)
    assert len(train) == 90 and len(val) == 10


def test_a_window_longer_than_both_splits_is_refused_with_the_longest_that_fits_both():
    with pytest.raises(SystemExit) as exit:
        data.split(torch.arange(100), block_size=500)
    assert "--block-size 500 fits neither the training split (90 ids) nor the validation split (10 ids)" in str(
        exit.value.code)
    assert "--block-size 9 or less" in str(exit.value.code)


@pytest.mark.parametrize("name", ["cuda", "mps"])
def test_unavailable_device_exits_with_a_message(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without either, wherever it runs
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit, match=f"--device {name} is not available on this machine \\(available: cpu\\)"):
        device.pick(name)


@pytest.mark.parametrize("cuda, mps, picked", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_device_auto_takes_cuda_then_mps_then_the_cpu(cuda, mps, picked, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert device.pick("auto") == torch.device(picked)


def test_a_cuda_devices_free_memory_is_cudas_free_count_not_its_total(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (3 * 2**30, 80 * 2**30))  # (free, total)
    assert device.free_memory(torch.device("cuda")) == 3 * 2**30


def main_raising(error):
    """A step's main, as every step wraps it, that raises `error`."""
    @device.explain_out_of_memory
    def main():
        raise error
    return main


def test_a_model_is_refused_when_16_bytes_a_parameter_pass_the_free_memory(monkeypatch):
    gpt = importlib.import_module("steps.10_training.model")
    config = gpt.GPTConfig(block_size=16, vocab_size=100, n_layer=3, n_head=2, n_embd=16)
    n = sum(p.numel() for p in gpt.GPT(config).parameters())  # the count built for real; the check builds 1 and 2
    monkeypatch.setattr(device, "free_memory", lambda d: 16 * n)
    device.refuse_a_model_too_big(gpt.GPT, config, torch.device("cpu"))  # fits to the byte
    monkeypatch.setattr(device, "free_memory", lambda d: 16 * n - 1)
    with pytest.raises(SystemExit, match=f"^error: a model of {n:,} parameters \\(3 layers of 16\\)"):
        device.refuse_a_model_too_big(gpt.GPT, config, torch.device("cpu"))


def test_the_processes_torchrun_starts_on_a_cpu_share_its_free_memory_in_the_model_check(monkeypatch):
    gpt = importlib.import_module("steps.10_training.model")
    config = gpt.GPTConfig(block_size=16, vocab_size=100, n_layer=3, n_head=2, n_embd=16)
    n = sum(p.numel() for p in gpt.GPT(config).parameters())
    monkeypatch.setattr(device, "free_memory", lambda d: 16 * n * 2)  # room for two models, not for three
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # set by torchrun: the processes on this machine
    device.refuse_a_model_too_big(gpt.GPT, config, torch.device("cpu"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match="for the 3 processes of NPROC=3; the cpu has"):
        device.refuse_a_model_too_big(gpt.GPT, config, torch.device("cpu"))


def test_on_a_cpu_the_first_process_of_the_machine_alone_decides_the_model_check(monkeypatch):
    # each would read the free memory at another moment, as the others fill it: near the limit they could differ,
    # and a refusal of a rank other than 0 is never seen (only rank 0 prints)
    gpt = importlib.import_module("steps.10_training.model")
    config = gpt.GPTConfig(block_size=16, vocab_size=100, n_layer=3, n_head=2, n_embd=16)
    monkeypatch.setattr(device, "free_memory", lambda d: 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    device.refuse_a_model_too_big(gpt.GPT, config, torch.device("cpu"))  # rank 1: no check; rank 0 refuses for both
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(SystemExit, match="for the 2 processes of NPROC=2"):
        device.refuse_a_model_too_big(gpt.GPT, config, torch.device("cpu"))


def test_where_the_free_memory_is_not_known_the_model_check_lets_the_run_go_on(monkeypatch):
    gpt = importlib.import_module("steps.10_training.model")
    config = gpt.GPTConfig(block_size=16, vocab_size=100, n_layer=3, n_head=2, n_embd=16)
    monkeypatch.setattr(device, "free_memory", lambda d: None)  # MPS: torch has no count of its free memory
    device.refuse_a_model_too_big(gpt.GPT, config, torch.device("mps"))


def test_processes_on_gpus_each_check_their_own_gpus_free_memory(monkeypatch):
    gpt = importlib.import_module("steps.10_training.model")
    config = gpt.GPTConfig(block_size=16, vocab_size=100, n_layer=3, n_head=2, n_embd=16)
    n = sum(p.numel() for p in gpt.GPT(config).parameters())
    monkeypatch.setattr(device, "free_memory", lambda d: 16 * n)  # one model's worth on each GPU
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: two processes, each on a GPU of its own
    device.refuse_a_model_too_big(gpt.GPT, config, torch.device("cuda"))


def test_the_memory_check_draws_nothing_from_the_random_generator():
    # it runs after torch.manual_seed and before the model is built: a draw would change every weight, and every
    # loss the diaries quote (the meta device's init draws nothing)
    gpt = importlib.import_module("steps.10_training.model")
    config = gpt.GPTConfig(block_size=16, vocab_size=100, n_layer=3, n_head=2, n_embd=16)
    before = torch.get_rng_state()
    device.refuse_a_model_too_big(gpt.GPT, config, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="reads Linux's /proc/meminfo")
def test_a_cpus_free_memory_is_linuxs_memavailable():
    assert 0 < device.free_memory(torch.device("cpu")) <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_a_cpus_free_memory_is_memavailable_in_bytes_not_memfree(monkeypatch):
    meminfo = "MemTotal:       24000000 kB\nMemFree:          100000 kB\nMemAvailable:    2000000 kB\n"
    monkeypatch.setattr(device, "Path", lambda path: SimpleNamespace(read_text=lambda: meminfo))
    assert device.free_memory(torch.device("cpu")) == 2_000_000 * 1024  # Linux's kB are KiB; MemFree leaves out caches


def test_a_cuda_out_of_memory_is_one_line_with_the_size_torch_gave():
    main = main_raising(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 3.12 GiB is free."))  # CUDA's words in torch 2
    with pytest.raises(SystemExit) as exit:
        main()
    assert str(exit.value.code).startswith("error: out of memory: a tensor of 20.00 GiB did not fit.")


def test_an_mps_out_of_memory_is_one_line_with_the_size_torch_gave():
    main = main_raising(RuntimeError("MPS backend out of memory (MPS allocated: 17.90 GB, other allocations: 1.20 GB, "
                                     "max allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool."))
    with pytest.raises(SystemExit) as exit:  # a RuntimeError, not torch.OutOfMemoryError: its words decide
        main()
    assert str(exit.value.code).startswith("error: out of memory: a tensor of 256.00 MB did not fit.")


def test_a_cpu_allocation_under_a_gib_is_said_in_mib():
    main = main_raising(RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                                     "allocate memory: you tried to allocate 52428800 bytes. Error code 12 (Cannot "
                                     "allocate memory)"))  # the CPU's words in torch 2.13
    with pytest.raises(SystemExit) as exit:
        main()
    assert str(exit.value.code).startswith("error: out of memory: a tensor of 50.0 MiB did not fit.")


@pytest.mark.parametrize("argv", [[], ["2"], ["x", "steps.16_ddp"], ["0", "steps.16_ddp"], ["\u00b2", "steps.16_ddp"]])
def test_the_launcher_called_by_hand_without_a_count_and_a_module_says_how_to_call_it(argv):
    with pytest.raises(SystemExit, match="error: python -m shared.launch NPROC MODULE"):
        launch.main(argv)


def test_the_launcher_refuses_more_processes_than_the_free_memory_holds_before_it_starts_one(monkeypatch):
    monkeypatch.setattr(device, "free_memory", lambda d: 2 * 2**30)  # 2 GiB: two processes of 700 MiB, not three
    with pytest.raises(SystemExit) as exit:
        launch.main(["3", "no_such_module"])  # a module that would fail at once, had anything started
    assert str(exit.value.code) == ("error: NPROC=3: each process holds a torch and a model of its own, about 700.0 "
                                    "MiB of memory at the smallest; 3 would need 2.1 GiB, and this machine has 2.0 GiB "
                                    "free (NPROC=2 at most)")


@pytest.fixture
def torchrun(monkeypatch) -> list[tuple[list[str], dict]]:
    """torchrun as the launcher calls it, stubbed: each call's argv and the environment it was started with. The
    launcher's own changes to os.environ are undone after the test, and the free memory is not known (no check)."""
    for name in ("OMP_NUM_THREADS", "LOGLEVEL"):  # launch.main sets them when they are not set
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(device, "free_memory", lambda d: None)
    started = []
    monkeypatch.setattr(torch.distributed.run, "main", lambda argv: started.append((argv, dict(os.environ))))
    return started


def test_the_launcher_starts_one_process_whatever_the_free_memory_as_a_run_without_nproc_would(monkeypatch,
                                                                                              torchrun):
    monkeypatch.setattr(device, "free_memory", lambda d: 2**20)  # 1 MiB
    assert launch.main(["1", "steps.16_ddp"]) == 0 and torchrun[0][0][:2] == ["--standalone", "--nproc-per-node=1"]


def test_the_launcher_starts_as_many_processes_as_the_free_memory_holds_to_the_byte(monkeypatch, torchrun):
    monkeypatch.setattr(device, "free_memory", lambda d: 3 * launch.PROCESS_BYTES - 1)
    with pytest.raises(SystemExit, match="error: NPROC=3"):
        launch.main(["3", "steps.16_ddp"])
    monkeypatch.setattr(device, "free_memory", lambda d: 3 * launch.PROCESS_BYTES)
    assert launch.main(["3", "steps.16_ddp"]) == 0 and "--nproc-per-node=3" in torchrun[0][0]


def test_the_launcher_gives_each_process_an_equal_share_of_the_cores(monkeypatch, torchrun):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    launch.main(["2", "steps.16_ddp"])
    assert torchrun[0][1]["OMP_NUM_THREADS"] == "4"  # each rank's torch: 4 threads, 8 in all; 8 each would fight


def test_the_launcher_keeps_torchruns_agent_to_its_errors():
    # torch's elastic modules read LOGLEVEL once, as they are imported: in a fresh process, with torchrun for real
    code = ("import logging; from shared import launch; launch.main(['1', 'no_such_module']); "
            "print(logging.getLogger('torch.distributed.elastic.agent.server.api').level)")
    env = {k: v for k, v in os.environ.items() if k != "LOGLEVEL"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.stdout.split()[-1] == str(logging.ERROR), r.stderr  # a warning at Ctrl-C would bury rank 0's resume line


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), SignalException("Process got signal: 2", signal.SIGINT)],
                         ids=["KeyboardInterrupt", "SignalException"])
def test_a_ctrl_c_that_reaches_the_launcher_exits_130_as_a_shell_reports_it(monkeypatch, torchrun, stop):
    def interrupted(argv):
        raise stop
    monkeypatch.setattr(torch.distributed.run, "main", interrupted)
    assert launch.main(["2", "steps.16_ddp"]) == 130


def test_a_rank_the_kernel_kills_is_said_to_be_killed_most_likely_for_want_of_memory(tmp_path):
    (tmp_path / "killed.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")  # as OOM kills
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    r = subprocess.run([sys.executable, "-m", "shared.launch", "1", "killed"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr == ("torchrun: rank 0 was killed (SIGKILL, most likely by the kernel for "
                                              "want of memory: fewer processes (NPROC) or a smaller model); the others "
                                              "were stopped\n")


@pytest.mark.parametrize("code", ["", "raise SystemExit(3)"], ids=["ends", "fails"])
def test_the_launcher_leaves_nothing_in_the_temporary_directory(tmp_path, code):
    (tmp_path / "rank.py").write_text(code + "\n")
    (tmp_path / "tmp").mkdir()  # torchrun made a torchelastic_* directory of logs there for every run, and left it
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "TMPDIR": str(tmp_path / "tmp")}
    r = subprocess.run([sys.executable, "-m", "shared.launch", "1", "rank"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == (3 if code else 0), r.stderr
    assert list((tmp_path / "tmp").iterdir()) == []


def test_another_rank_than_0_neither_makes_nor_checks_the_out_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # under torchrun: rank 0 alone writes there, and it makes the directory
    assert cli.out_dir(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists()


def test_the_projects_own_files_are_refused_on_every_rank(monkeypatch):
    monkeypatch.setenv("RANK", "1")  # a scheduler may export RANK to a make data or make book as well
    with pytest.raises(argparse.ArgumentTypeError, match="is the project's own"):
        cli.out_dir(str(ROOT / "steps"))


@pytest.mark.parametrize("error", [  # torch 2.13's words, met with --batch-size 1e19, 2**63 - 1 and --max-letters 1e20
    TypeError("randint(): argument 'size' failed to unpack the object at pos 1 with error \"Overflow when unpacking "
              "long long\""),
    RuntimeError("Storage size calculation overflowed with sizes=[9223372036854775807]"),
    OverflowError("int too big to convert"),
    ValueError("Overflow when unpacking long long"),  # torch.multinomial's, for a count of 10**19
])
def test_a_size_too_big_to_count_is_one_line_like_out_of_memory(error):
    with pytest.raises(SystemExit) as exit:
        main_raising(error)()
    assert str(exit.value.code).startswith("error: a size or count of 2**63 or more, past what torch holds in 64")


@pytest.mark.parametrize("error", [TypeError("unsupported operand"), OverflowError("math range error"),
                                   ValueError("too many values to unpack")])
def test_any_other_type_value_or_overflow_error_is_not_called_out_of_memory(error):
    with pytest.raises(type(error)):
        main_raising(error)()


def test_any_other_runtime_error_is_not_called_out_of_memory():
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        main_raising(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))()


def test_run_log_writes_metrics_summary_and_a_loss_curve(tmp_path, capsys):
    log = runlog.RunLog(tmp_path, total=2)
    log.log(0, 2.5, 0.1, tokens=100)
    log.log(1, 2.0, 0.1, tokens=100, grad_norm=0.5)
    log.close(val_loss=2.1)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["loss"], r["lr"]) for r in rows] == [(0, 2.5, 0.1), (1, 2.0, 0.1)]
    assert rows[1]["grad_norm"] == 0.5
    assert json.loads((tmp_path / "summary.json").read_text()) == {"val_loss": 2.1}
    assert (tmp_path / "loss.svg").read_text().startswith("<svg")
    assert "iter     1 | loss 2.0000 | lr 1.00e-01" in capsys.readouterr().out


def test_ctrl_c_inside_closed_on_ctrl_c_writes_a_summary_marked_interrupted_and_the_curve_then_goes_on(tmp_path):
    log = runlog.RunLog(tmp_path, total=10)
    with pytest.raises(KeyboardInterrupt), log.closed_on_ctrl_c():
        log.log(0, 2.5, 0.1)
        log.log(1, 2.0, 0.1)
        raise KeyboardInterrupt  # as Ctrl-C does, anywhere in the block
    assert json.loads((tmp_path / "summary.json").read_text()) == {"interrupted": {"iters_done": 2}}
    assert (tmp_path / "loss.svg").read_text().startswith("<svg")
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("start, advice", [(0, "A smaller --lr may help."), (3, "A smaller --lr may help in a new run")])
def test_a_nan_loss_advises_a_smaller_lr_in_a_new_run_when_the_run_was_resumed(tmp_path, start, advice):
    log = runlog.RunLog(tmp_path, total=10, start=start)  # --resume refuses another --lr: it is in the config
    with pytest.raises(SystemExit) as exit:
        log.log(start, float("nan"), 1e-3)
    assert advice in str(exit.value.code)


@pytest.mark.usefixtures("files_of_at_most_100_kb", "capsys")  # capsys: the lines go to memory, not to a file
def test_a_metrics_row_that_cannot_be_written_stops_the_run_in_one_line(tmp_path):  # the limit could stop (-s > log)
    log = runlog.RunLog(tmp_path, total=10_000)
    with pytest.raises(SystemExit) as exit:
        for it in range(10_000):  # about 70 bytes a row: past 100 kB within 2,000 rows
            log.log(it, 1.0, 1e-3)
    assert str(exit.value.code) == f"error: cannot write {tmp_path / 'metrics.jsonl'} (File too large)"


@pytest.mark.parametrize("name", ["summary.json", "loss.svg"])
def test_a_summary_or_curve_that_cannot_be_written_stops_the_run_in_one_line(tmp_path, name):
    log = runlog.RunLog(tmp_path, total=2)
    log.log(0, 2.5, 0.1)
    log.log(1, 2.0, 0.1)
    (tmp_path / name).symlink_to("/dev/full")  # a full disk: every write fails with ENOSPC
    with pytest.raises(SystemExit) as exit:
        log.close(val_loss=2.1)
    assert str(exit.value.code) == f"error: cannot write {tmp_path / name} (No space left on device)"


def a_run(where: Path, losses: list[float], val: dict[int, float] | None = None) -> Path:
    """A run's directory as make step leaves it: metrics.jsonl, a row an iteration, val_loss on some."""
    where.mkdir(parents=True)
    rows = [{"iter": i, "loss": loss, **({"val_loss": (val or {})[i]} if i in (val or {}) else {})}
            for i, loss in enumerate(losses)]
    (where / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return where


def test_make_curves_draws_each_runs_training_and_validation_loss_in_a_colour_of_its_own(tmp_path, capsys):
    a = a_run(tmp_path / "13_vocab_50304", [10.8, 7.0, 6.5, 6.0], {1: 7.2, 3: 6.6})
    b = a_run(tmp_path / "14_gpt3_hparams", [10.8, 8.0, 6.2, 5.8], {1: 8.1, 3: 6.3})
    assert curves.main([str(a), str(b), "--out", str(tmp_path / "c.svg")]) == 0
    svg = (tmp_path / "c.svg").read_text()
    assert svg.count("<polyline") == 4  # two runs, a training and a validation curve each
    for name in ("13_vocab_50304 train", "13_vocab_50304 validation", "14_gpt3_hparams train",
                 "14_gpt3_hparams validation"):
        assert f">{name}</text>" in svg
    colours = re.findall(r'<polyline [^>]*stroke="([^"]+)"', svg)  # both runs' training, then their validation
    assert colours[0] == colours[2] != colours[1] == colours[3]  # one colour a run, another for the next
    assert "14_gpt3_hparams: validation loss 6.3000 at iteration 3" in capsys.readouterr().out  # not one batch's


def test_make_curves_draws_validation_thick_and_training_thin_and_faint(tmp_path):
    a = a_run(tmp_path / "r", [3.0, 2.0, 1.5], {0: 3.1, 2: 1.6})
    curves.main([str(a), "--out", str(tmp_path / "c.svg")])
    train, val = re.findall(r"<polyline [^>]*>", (tmp_path / "c.svg").read_text())
    assert 'stroke-width="1.5" stroke-opacity="0.5"' in train  # one batch a point: noisy
    assert 'stroke-width="2.5"' in val and "opacity" not in val  # the whole split each time: the one to read


def test_make_curves_draws_a_picture_a_browser_reads_whatever_the_runs_are_called(tmp_path):
    import xml.etree.ElementTree as ET

    a = a_run(tmp_path / "a&b <c>", [3.0, 2.0])
    curves.main([str(a), "--out", str(tmp_path / "c.svg")])
    assert ET.parse(tmp_path / "c.svg").getroot().tag.endswith("svg")  # a bare & or < is not well-formed XML


def test_make_curves_leaves_out_a_row_with_a_loss_that_is_not_a_number(tmp_path, capsys):
    a = a_run(tmp_path / "r", [3.0, 2.0, 1.0])
    (a / "metrics.jsonl").write_text((a / "metrics.jsonl").read_text() + '{"iter": 3, "loss": NaN}\n')
    curves.main([str(a), "--out", str(tmp_path / "c.svg")])  # make step writes null: this one was edited by hand
    assert "nan" not in (tmp_path / "c.svg").read_text().lower()
    assert "1 line that is not a row of make step's log left out" in capsys.readouterr().err


def test_make_curves_draws_no_point_for_a_loss_logged_as_null(tmp_path, capsys):
    a = a_run(tmp_path / "r", [3.0, 2.0, 1.0])
    (a / "metrics.jsonl").write_text((a / "metrics.jsonl").read_text() + '{"iter": 3, "loss": null}\n')  # nan's JSON
    assert curves.main([str(a), "--out", str(tmp_path / "c.svg")]) == 0
    assert "r: train loss 1.0000 at iteration 2" in capsys.readouterr().out


def test_make_curves_leaves_out_a_row_without_an_iteration_number(tmp_path, capsys):
    a = a_run(tmp_path / "r", [3.0, 2.0, 1.0])
    (a / "metrics.jsonl").write_text((a / "metrics.jsonl").read_text() + '{"loss": 0.5}\n{"iter": "3", "loss": 0.5}\n')
    curves.main([str(a), "--out", str(tmp_path / "c.svg")])
    assert "2 lines that are not rows of make step's log left out" in capsys.readouterr().err


def test_a_metrics_file_whose_last_line_is_cut_off_ends_its_curve_at_the_line_before(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iter": 0, "loss": 3.0}\n{"iter": 1, "lo')  # a run killed mid-write
    rows, notes = runlog.metrics_rows(tmp_path / "metrics.jsonl")
    assert rows == [{"iter": 0, "loss": 3.0}] and notes == [
        "its last line is cut off (a run that was stopped?): the curve ends at the line before"]


def test_a_metrics_file_of_one_bad_line_is_not_called_cut_off(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("not json\n")  # never a log: nothing before it was a row
    assert runlog.metrics_rows(tmp_path / "metrics.jsonl") == ([], ["1 line that is not a row of make step's log left out"])


def test_a_curve_of_one_point_is_drawn_as_a_dot():
    svg = runlog.loss_svg({"a run validation": [(10, 2.0)], "a run train": [(0, 3.0), (10, 2.1)]})
    assert svg.count("<circle") == 1 and svg.count("<polyline") == 1  # a polyline of one point shows nothing


def test_make_curves_says_a_metrics_file_it_cannot_read_in_one_line(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").symlink_to("/proc/self/mem")  # a file that is there but fails to read (EIO)
    with pytest.raises(SystemExit) as exit:
        curves.main([str(tmp_path / "r"), "--out", str(tmp_path / "c.svg")])
    assert exit.value.code == 2 and f"cannot read {tmp_path / 'r' / 'metrics.jsonl'} (" in capsys.readouterr().err


def test_make_curves_refuses_a_run_named_twice_naming_it(tmp_path, capsys):
    a = a_run(tmp_path / "r", [3.0, 2.0])
    with pytest.raises(SystemExit) as exit:
        curves.main([str(a), f"{tmp_path}/../{tmp_path.name}/r", "--out", str(tmp_path / "c.svg")])
    assert exit.value.code == 2 and f"{tmp_path}/../{tmp_path.name}/r is named twice (as {a} before)" in \
        capsys.readouterr().err


def test_make_curves_names_two_runs_of_one_step_by_their_paths(tmp_path):
    a = a_run(tmp_path / "seed0" / "10_training", [3.0, 2.0])
    b = a_run(tmp_path / "seed1" / "10_training", [3.1, 2.1])
    curves.main([str(a), str(b), "--out", str(tmp_path / "c.svg")])
    svg = (tmp_path / "c.svg").read_text()
    assert f">{a} train</text>" in svg and f">{b} train</text>" in svg


@pytest.mark.parametrize("given, said", [
    ("missing", "does not exist"),
    ("13_vocab_50304", "13_vocab_50304 does not exist (make step N=13 writes runs/13_vocab_50304)"),
    ("empty", "holds no metrics.jsonl: give the --out of a make step run"),
    ("no_loss", "has no loss to draw"),
])
def test_make_curves_refuses_a_directory_that_is_not_a_run_in_one_line(tmp_path, capsys, given, said):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_loss").mkdir()
    (tmp_path / "no_loss" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit:
        curves.main([str(tmp_path / given), "--out", str(tmp_path / "c.svg")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and said in err and "Traceback" not in err and "usage:" not in err
    assert not (tmp_path / "c.svg").exists()


def test_make_curves_refuses_an_out_it_cannot_write_in_one_line(tmp_path, capsys):
    a = a_run(tmp_path / "r", [3.0, 2.0])
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit:
        curves.main([str(a), "--out", str(tmp_path / "a_file" / "c.svg")])
    assert exit.value.code == 2 and f"argument --out: {tmp_path / 'a_file'} is a file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        curves.main([str(a), "--out", str(tmp_path)])
    assert f"{tmp_path} is a directory; give a file name, e.g. {tmp_path / 'curves.svg'}" in capsys.readouterr().err


@pytest.mark.parametrize("out, said", [
    ("README.md", "README.md is the project's own"),
    ("A_RUN/metrics.jsonl", "metrics.jsonl is not named .svg"),
    ("A_RUN/loss.svg", "loss.svg is the loss curve make step drew for the run beside it"),
    ("c.png", "c.png is not named .svg: the picture is an SVG"),
], ids=["readme", "its-own-input", "a-runs-curve", "not-svg"])
def test_make_curves_refuses_an_out_that_would_overwrite_a_file_not_its_own(tmp_path, capsys, out, said):
    a = a_run(tmp_path / "r", [3.0, 2.0])
    out = str(ROOT / out) if out == "README.md" else out.replace("A_RUN", str(a))
    before = {p: p.read_bytes() for p in (ROOT / "README.md", a / "metrics.jsonl", a / "loss.svg") if p.exists()}
    with pytest.raises(SystemExit) as exit:
        curves.main([str(a), "--out", out])
    assert exit.value.code == 2 and said in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before


def test_make_curves_draws_a_picture_of_another_name_beside_a_runs_metrics(tmp_path):
    a = a_run(tmp_path / "r", [3.0, 2.0])
    assert curves.svg_file(str(a / "compare.svg")) == a / "compare.svg"  # only its own loss.svg is the run's


def test_make_curves_draws_a_diarys_picture_into_diary_img_and_nowhere_else_in_the_project():
    picture = str(ROOT / "diary/img/14_gpt3_hparams.svg")  # diary 14's command draws it
    assert curves.svg_file(picture) == Path(picture)
    for out in ("diary/14_gpt3_hparams.svg", "diary/img/sub/x.svg", "steps/x.svg", "docs/x.svg",
                "Diary/img/x.svg", "diary/IMG/x.svg"):  # on a disk that tells case apart, not diary/img
        with pytest.raises(argparse.ArgumentTypeError, match="is the project's own"):
            curves.svg_file(str(ROOT / out))
    with pytest.raises(argparse.ArgumentTypeError, match="not named .svg"):
        curves.svg_file(str(ROOT / "diary/img/notes.md"))


def test_make_curves_refuses_more_runs_than_it_has_colours(tmp_path, capsys):
    runs = [str(a_run(tmp_path / f"r{i}", [3.0, 2.0])) for i in range(len(curves.PALETTE) + 1)]
    with pytest.raises(SystemExit) as exit:
        curves.main([*runs, "--out", str(tmp_path / "c.svg")])
    assert exit.value.code == 2 and f"{len(runs)} runs: {len(curves.PALETTE)} at most" in capsys.readouterr().err


def test_make_curves_draws_as_many_runs_as_it_has_colours(tmp_path):
    runs = [str(a_run(tmp_path / f"r{i}", [3.0, 2.0])) for i in range(len(curves.PALETTE))]
    assert curves.main([*runs, "--out", str(tmp_path / "c.svg")]) == 0
    assert (tmp_path / "c.svg").read_text().count("<polyline") == len(curves.PALETTE)


def test_make_curves_ends_by_naming_the_picture_it_drew(tmp_path, capsys):
    a = a_run(tmp_path / "r", [3.0, 2.0])
    curves.main([str(a), "--out", str(tmp_path / "c.svg")])
    assert capsys.readouterr().out.splitlines()[-1] == f"curves: {tmp_path / 'c.svg'}"


def test_make_curves_writes_runs_curves_svg_unless_told_otherwise(tmp_path, monkeypatch):
    a = a_run(tmp_path / "r", [3.0, 2.0])
    monkeypatch.chdir(tmp_path)  # make runs it in the project's root
    assert curves.main([str(a)]) == 0 and (tmp_path / "runs" / "curves.svg").read_text().startswith("<svg")


def test_make_curves_runs_from_make(tmp_path):
    a = a_run(tmp_path / "r", [3.0, 2.0])
    r = subprocess.run(["make", "-s", "curves", f"ARGS={a} --out {tmp_path / 'c.svg'}"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0 and (tmp_path / "c.svg").read_text().startswith("<svg")


def test_a_new_run_log_removes_an_earlier_runs_summary_and_curve_a_resumed_one_keeps_them(tmp_path):
    for name in ("summary.json", "loss.svg"):
        (tmp_path / name).write_text("the earlier run's")
    runlog.RunLog(tmp_path, total=10, start=3).close()  # resumed: they stay until this run writes its own
    assert (tmp_path / "summary.json").exists() and (tmp_path / "loss.svg").exists()
    runlog.RunLog(tmp_path, total=10).close()  # a new run that stops before its end: no summary, no curve yet
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "loss.svg").exists()


def test_a_new_run_that_fails_before_its_first_row_leaves_the_earlier_runs_files_as_they_were(tmp_path):
    runlog.RunLog(tmp_path, total=2).log(0, 2.5, 0.1)
    for name in ("summary.json", "loss.svg"):
        (tmp_path / name).write_text("the earlier run's")
    earlier = (tmp_path / "metrics.jsonl").read_text()
    runlog.RunLog(tmp_path, total=10).file.close()  # out of memory in its first iteration: the process ends
    assert (tmp_path / "metrics.jsonl").read_text() == earlier
    assert (tmp_path / "summary.json").exists() and (tmp_path / "loss.svg").exists()


def test_run_log_prints_every_nth_iteration_and_the_last_with_an_eta(tmp_path, capsys):
    log = runlog.RunLog(tmp_path, total=100)  # no --log-every: about 25 lines
    for it in range(100):
        log.log(it, 1.0, 0.1)
    log.close()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter")]
    assert [int(line.split()[1]) for line in lines] == [*range(0, 100, 4), 99]
    assert lines[0].endswith(" elapsed")  # after one iteration, there is no rate to tell from the start-up's cost
    assert all("elapsed, eta" in line for line in lines[1:])
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 100  # the file keeps every iteration


@pytest.mark.parametrize("every, printed", [
    (0, [0, 2, 4]),  # the default, a line every 40,000 iterations: and one when a minute has gone by without one
    (100_000, [0]),  # --log-every given: that, and no more
])
def test_a_run_log_at_the_default_cadence_prints_a_line_at_least_every_minute(tmp_path, capsys, monkeypatch, every,
                                                                               printed):
    now = {"s": 0.0}
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: now["s"])
    log = runlog.RunLog(tmp_path, total=1_000_000, every=every)
    for it, seconds in enumerate([1, 2, 61, 62, 125]):  # iteration 2 ends 60 s after iteration 0's line, 4 64 s
        now["s"] = seconds
        log.log(it, 1.0, 0.1)
    assert [int(line.split()[1]) for line in capsys.readouterr().out.splitlines() if line.startswith("iter")] == printed


def test_a_validation_line_counts_as_a_line_for_the_minute(tmp_path, capsys, monkeypatch):
    now = {"s": 1.0}
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: now["s"])
    log = runlog.RunLog(tmp_path, total=1_000_000)
    log.log(0, 1.0, 0.1)
    now["s"] = 70.0  # a long evaluation ends, with its line
    log.log_val(0, 1.0)
    now["s"] = 71.0
    log.log(1, 1.0, 0.1)  # 70 s after iteration 0's line, 1 s after the validation line: no line
    assert [line.split("|")[1].split()[0] for line in capsys.readouterr().out.splitlines()] == ["loss", "val"]


def test_the_eta_leaves_out_the_first_iterations_start_up_cost(tmp_path, capsys, monkeypatch):
    now = {"s": 0.0}
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: now["s"])
    log = runlog.RunLog(tmp_path, total=10, every=1)
    now["s"] = 100.0  # iteration 0 took 100 s (compiling, say)
    log.log(0, 1.0, 0.1)
    now["s"] = 101.0  # iteration 1 took 1 s: 8 more take 8 s, not 8 x 50.5 s
    log.log(1, 1.0, 0.1)
    assert capsys.readouterr().out.splitlines()[-1].endswith("| 1:41 elapsed, eta 0:08")


@pytest.mark.parametrize("loss", ["nan", "inf"])
def test_run_log_stops_at_a_nan_or_infinite_loss_naming_the_iteration_and_the_lr(tmp_path, loss):
    log = runlog.RunLog(tmp_path, total=10)
    log.log(0, 2.5, 0.5)
    with pytest.raises(SystemExit) as exit:
        log.log(1, float(loss), 0.5)
    assert str(exit.value.code).startswith(f"error: the loss is {loss} at iteration 1 (lr 0.5)")
    summary = json.loads((tmp_path / "summary.json").read_text())  # strict JSON: no NaN or Infinity in it
    assert summary == {"diverged": {"iter": 1, "loss": loss, "lr": 0.5}}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["loss"] is None


def test_a_second_run_log_in_the_same_directory_stops_while_the_first_runs(tmp_path):
    first = runlog.RunLog(tmp_path, total=10)
    first.log(0, 2.5, 0.5)
    with pytest.raises(SystemExit, match=f"error: another run is writing to {tmp_path} now"):
        runlog.RunLog(tmp_path, total=10)
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1  # the first run's row is still there
    first.close()
    runlog.RunLog(tmp_path, total=10)  # once it has ended, the directory is free


def test_plural_counts_one_thing_and_many_with_thousands_separated():
    assert [cli.plural(n, "layer") for n in (1, 2, 1000)] == ["1 layer", "2 layers", "1,000 layers"]


def test_a_run_of_one_iteration_says_it_has_no_loss_curve(tmp_path, capsys):
    log = runlog.RunLog(tmp_path, total=1)
    log.log(0, 2.5, 0.1)
    log.close()
    assert "no loss curve: it needs two iterations" in capsys.readouterr().out
    assert not (tmp_path / "loss.svg").exists()


def test_asking_whether_a_run_is_writing_stops_while_one_is(tmp_path):
    running = runlog.RunLog(tmp_path, total=10)
    with pytest.raises(SystemExit, match=f"error: another run is writing to {tmp_path} now"):
        runlog.refuse_if_running(tmp_path)
    running.close()
    runlog.refuse_if_running(tmp_path)  # ended: free


def test_asking_whether_a_run_is_writing_makes_no_file_and_holds_no_lock(tmp_path):
    runlog.refuse_if_running(tmp_path / "out")  # no such directory yet: nothing is writing there
    runlog.refuse_if_running(tmp_path)
    assert list(tmp_path.iterdir()) == []  # a run refused after asking leaves an empty --out, removed at exit
    (tmp_path / "metrics.jsonl").write_text("")  # an earlier run's, ended
    runlog.refuse_if_running(tmp_path)
    runlog.RunLog(tmp_path, total=10).close()  # the directory was left free: a run in the same process takes it


def test_the_ranks_of_one_run_asking_at_the_same_moment_do_not_stop_each_other(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    fd = os.open(tmp_path / "metrics.jsonl", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another rank, asking now
    runlog.refuse_if_running(tmp_path)
    os.close(fd)


def test_a_resumed_run_log_keeps_the_rows_before_its_start(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"iter": i, "loss": 1.0}) + "\n" for i in range(5)))
    log = runlog.RunLog(tmp_path, total=10, start=3)  # a checkpoint of iteration 2: rows 3 and 4 are done again
    assert [r["iter"] for r in log.rows] == [0, 1, 2]


def test_a_resumed_run_log_without_its_metrics_file_starts_a_new_one_with_a_note(tmp_path, capsys):
    log = runlog.RunLog(tmp_path, total=10, start=3)
    assert log.rows == [] and "metrics.jsonl cannot be read (FileNotFoundError)" in capsys.readouterr().out


def test_a_resumed_run_log_keeps_the_rows_before_a_line_cut_off_by_a_crash(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"iter": 0, "loss": 1.0}\n{"iter": 1, "loss": 1.0}\n{"iter": 2, "lo')
    log = runlog.RunLog(tmp_path, total=10, start=3)
    assert [r["iter"] for r in log.rows] == [0, 1]
    assert "metrics.jsonl, line 3, is damaged: the log keeps the 2 rows before it" in capsys.readouterr().out


def test_a_resumed_run_log_keeps_no_row_after_a_damaged_line_either(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"iter": 0, "loss": 1.0}\n{"it\n{"iter": 2, "loss": 1.0}\n')
    log = runlog.RunLog(tmp_path, total=10, start=3)
    assert [r["iter"] for r in log.rows] == [0]  # what follows a damaged line may be as damaged: the log starts there
    assert "metrics.jsonl, line 2, is damaged: the log keeps the 1 rows before it" in capsys.readouterr().out


def test_run_log_ends_with_the_median_speed_of_this_runs_iterations_only(tmp_path, capsys, monkeypatch):
    earlier = [{"iter": i, "loss": 1.0, "lr": 0.1, "ms": 1000.0, "tok_per_s": 100} for i in range(3)]  # a slow run
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in earlier))
    clock = iter([0.0, 0.010, 0.040, 0.070, 0.080, 5.0])  # start, 3 (10 ms), evaluation, 4 (30 ms), 5 (10 ms), end
    monkeypatch.setattr(runlog, "time", argparse.Namespace(perf_counter=lambda: next(clock)))
    log = runlog.RunLog(tmp_path, total=100, every=1000, start=3)
    log.log(3, 1.0, 0.1, tokens=100)
    log.log_val(3, 1.0)  # not an iteration: no ms, and its time is not the next iteration's
    log.log(4, 1.0, 0.1, tokens=100)
    log.log(5, 1.0, 0.1, tokens=100)
    log.close()
    assert ("speed: median 10.00 ms an iteration, 10,000 tok/s over this run's 3 iterations; 0:05 since the first"
            in capsys.readouterr().out)


def test_run_log_writes_a_thousand_iterations_in_its_speed_line_with_a_comma(tmp_path, capsys, monkeypatch):
    now = iter(range(10**6))  # the clock: a second later at each reading
    monkeypatch.setattr(runlog, "time", argparse.Namespace(perf_counter=lambda: float(next(now))))
    log = runlog.RunLog(tmp_path, total=1000, every=1000)
    for i in range(1000):  # step 04's default run
        log.log(i, 1.0, 0.1, tokens=100)
    log.close()
    assert "over this run's 1,000 iterations;" in capsys.readouterr().out


def test_run_log_times_the_iteration_after_an_evaluation_from_the_evaluations_end(tmp_path, monkeypatch):
    now = [0.0]  # the clock, in seconds
    monkeypatch.setattr(runlog, "time", argparse.Namespace(perf_counter=lambda: now[0]))
    log = runlog.RunLog(tmp_path, total=100, every=1000)
    now[0] = 0.010
    log.log(0, 1.0, 0.1, tokens=100)  # 10 ms
    now[0] = 0.040
    log.log_val(0, 1.0)  # an evaluation of 30 ms
    now[0] = 0.070
    log.log(1, 1.0, 0.1, tokens=100)  # 30 ms after the evaluation
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("ms") for r in rows] == [10.0, None, 30.0]  # not 60: the evaluation's 30 ms are not iteration 1's


def test_run_log_summary_is_valid_json_whatever_the_values(tmp_path):
    log = runlog.RunLog(tmp_path, total=1)
    log.close(val_loss=float("inf"), ok=1.0)
    text = (tmp_path / "summary.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON")) == {"val_loss": None, "ok": 1.0}


@pytest.mark.parametrize("text, message", [("inf", "finite"), ("nan", "finite"), ("-1", "finite"), ("x", "finite")])
def test_positive_float_refuses_what_is_not_a_positive_finite_number(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        cli.positive_float(text)


def test_the_largest_learning_rate_is_the_one_whose_first_adamw_step_size_fits_in_float32():
    p = torch.nn.Parameter(torch.ones(1))
    p.grad = torch.ones(1)
    torch.optim.AdamW([p], lr=cli.learning_rate("3.3e37")).step()  # 3.3e38: float32 holds it
    with pytest.raises(argparse.ArgumentTypeError, match="below 3.4e37"):
        cli.learning_rate("3.5e37")
    with pytest.raises(RuntimeError, match="overflow"):  # what the refusal saves a learner from
        torch.optim.AdamW([p], lr=3.5e37).step()


@pytest.mark.parametrize("text", ["0", str(2**32 - 1)])
def test_seed_takes_every_seed_torch_takes_from_0_to_2_to_the_32_minus_1(text):
    assert cli.seed(text) == int(text)
    torch.manual_seed(int(text))


@pytest.mark.parametrize("text", ["-1", str(2**32), "99999999999999999999999", "1.5"])
def test_seed_refuses_what_torch_cannot_take(text):
    with pytest.raises(argparse.ArgumentTypeError, match="a seed from 0 to 4294967295"):
        cli.seed(text)


@pytest.mark.parametrize("e, said", [(RuntimeError("no compiler\nat line 3"), "RuntimeError: no compiler"),
                                     (RuntimeError(), "RuntimeError"),
                                     (ValueError("x" * 300), "ValueError: " + "x" * 200)])
def test_an_exception_is_said_in_one_line_its_name_alone_when_its_message_is_empty(e, said):
    assert cli.one_line(e) == said


@pytest.mark.parametrize("n, said", [(1, "1 byte"), (1023, "1,023 bytes"), (1024, "1.0 KiB"), (32768, "32.0 KiB"),
                                     (36 * 2**20, "36.0 MiB"), (3 * 2**29, "1.5 GiB"), (2**50, "1,024.0 TiB")])
def test_a_size_is_said_in_the_largest_unit_that_leaves_at_least_1(n, said):  # a small KV cache is not "0.0 MiB"
    assert cli.size(n) == said


def test_out_dir_is_made_and_checked_when_parsed(tmp_path):
    assert cli.out_dir(str(tmp_path / "a" / "b")).is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="is a file, not a directory"):
        cli.out_dir(str(tmp_path / "file"))
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write to /proc/forbidden"):
        cli.out_dir("/proc/forbidden")


@pytest.mark.parametrize("out", ["runs", "runs/10_training"])
def test_an_out_dir_on_a_broken_link_is_refused_naming_where_it_points(tmp_path, out):
    (tmp_path / "runs").symlink_to(tmp_path / "gone")  # a runs/ linked to a disk that is not mounted
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{tmp_path / 'runs'} is a link to {tmp_path / 'gone'}, "
                                                         "which does not exist$"):
        cli.out_dir(str(tmp_path / out))


@pytest.mark.parametrize("kind", [cli.out_dir, cli.out_file, cli.existing_dir])
def test_a_path_with_a_name_too_long_is_refused_in_one_line(kind):
    with pytest.raises(argparse.ArgumentTypeError, match=r"^cannot (read|write to) a{300} \(File name too long\)$"):
        kind("a" * 300)  # 255 bytes is the most a name may have on Linux's file systems


@pytest.mark.parametrize("name, saves", [("01_embedding", False), ("08_gpt2", False), ("10_training", True)])
def test_outs_help_names_a_checkpoint_only_where_the_step_saves_one(name, saves):
    assert ("checkpoint.pt and model/" in cli.parser("doc", name, max_steps=5).format_help()) == saves


def test_the_default_out_is_checked_when_parsed_too(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("a file where the runs should go")
    with pytest.raises(SystemExit) as exit:
        cli.parser("doc", "01_embedding", max_steps=5).parse_args([])
    assert exit.value.code == 2 and "argument --out: cannot write to runs/01_embedding (" in capsys.readouterr().err


def test_out_dir_leaves_for_exit_the_directories_it_made_and_no_other_as_absolute_paths(tmp_path, monkeypatch):
    registered = []
    monkeypatch.setattr(cli.atexit, "register", lambda f, *args: registered.append((f, *args)))
    monkeypatch.chdir(tmp_path)  # a relative --out, and a process that may end in another directory
    (tmp_path / "old").mkdir()  # there before the run: never removed
    cli.out_dir("old/new/run")
    assert registered == [(cli.remove_if_empty, [tmp_path / "old" / "new" / "run", tmp_path / "old" / "new"])]


@pytest.mark.parametrize("summary, said", [
    (None, "already holds a checkpoint of an earlier run. Continue it with --resume"),  # stopped before its end
    ('{"interrupted": {"iters_done": 4}}', "Continue it with --resume"), ("not json", "Continue it with --resume"),
    ('{"diverged": {"iter": 4}}', "holds a run that diverged"), ('{"val_loss": 6.5}', "holds a finished run"),
], ids=["no-summary", "interrupted", "damaged-summary", "diverged", "finished"])
def test_a_new_run_into_an_earlier_ones_directory_is_told_to_resume_only_a_run_that_can_go_on(tmp_path, summary, said):
    torch.save({"iter": 4}, tmp_path / "checkpoint.pt")  # a zip archive, as torch.save writes
    if summary:
        (tmp_path / "summary.json").write_text(summary)
    with pytest.raises(SystemExit) as exit:
        checkpoint.refuse_to_overwrite(tmp_path)
    go_on = "Continue it" in said  # a finished run has nothing to resume; a diverged one would diverge again
    assert said in exit.value.code and ("--resume" in exit.value.code) == go_on
    assert f"delete {tmp_path / 'checkpoint.pt'} yourself" in exit.value.code  # the file, never the whole --out


@pytest.mark.parametrize("damage, why", [("garbage", "not the zip archive that torch.save writes"),
                                         ("cut", "cut short: the write that made it did not finish")])
def test_a_new_run_into_a_directory_with_a_damaged_checkpoint_is_not_told_to_resume_it(tmp_path, damage, why):
    path = tmp_path / "checkpoint.pt"
    torch.save({"iter": 4, "model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(b"an earlier run's" if damage == "garbage" else path.read_bytes()[:-100])
    with pytest.raises(SystemExit) as exit:
        checkpoint.refuse_to_overwrite(tmp_path)
    assert exit.value.code == (f"error: {tmp_path} holds a checkpoint of an earlier run that cannot be read ({why}): "
                               f"nothing can resume from it. Start the new run elsewhere with --out, or delete {path} "
                               "yourself.")


def test_a_setting_only_one_of_two_steps_has_is_said_to_be_missing_not_shown_as_a_value(tmp_path):
    with pytest.raises(SystemExit) as exit:  # step 10's checkpoint resumed by step 11, which adds --dtype
        checkpoint.check_config(tmp_path, {"step": "10_training"}, {"step": "11_mixed_precision", "dtype": "bf16"})
    assert exit.value.code.splitlines()[1:] == ["  step: '10_training' in the checkpoint, '11_mixed_precision' now",
                                                "  dtype: no such setting in the checkpoint, 'bf16' now"]


@pytest.mark.parametrize("summary", ["{", "[1]", '{"interrupted": 3}', ""])  # cut off, edited, another run's
def test_a_damaged_summary_beside_the_checkpoint_leaves_the_settings_refusal_as_it_is(tmp_path, summary):
    (tmp_path / "summary.json").write_text(summary)  # where a Ctrl-C's resume command would be
    with pytest.raises(SystemExit) as exit:
        checkpoint.check_config(tmp_path, {"step": "10_training"}, {"step": "11_mixed_precision"})
    assert exit.value.code.splitlines()[1:] == ["  step: '10_training' in the checkpoint, '11_mixed_precision' now"]


def test_a_fresh_run_log_refuses_a_directory_with_a_checkpoint_and_leaves_its_metrics(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iter": 0, "loss": 1.0}\n')
    torch.save({"iter": 4}, tmp_path / "checkpoint.pt")
    with pytest.raises(SystemExit, match="already holds a checkpoint of an earlier run"):
        runlog.RunLog(tmp_path, total=5, fresh=True)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iter": 0, "loss": 1.0}\n'


def test_remove_if_empty_goes_up_from_the_deepest_and_stops_at_the_first_that_holds_something(tmp_path):
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    cli.remove_if_empty([tmp_path / "a" / "b" / "c", tmp_path / "a" / "b", tmp_path / "a"])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "metrics.jsonl").write_text("{}")
    cli.remove_if_empty([tmp_path / "a" / "b" / "c", tmp_path / "a" / "b", tmp_path / "a"])
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == ["b", "metrics.jsonl"]  # c went; b held a file


@pytest.mark.parametrize("kind, out", [(cli.out_dir, ""), (cli.out_dir, "steps/10_training"), (cli.out_dir, "tests"),
                                       (cli.out_dir, "runs/../diary"), (cli.out_dir, "Steps/08_gpt2"),
                                       (cli.out_file, "README.md"), (cli.out_file, "readme.md"),
                                       (cli.out_file, "Makefile"), (cli.out_file, "shared/results.json")])
def test_the_projects_root_its_sources_and_its_own_files_are_refused_as_an_out(kind, out):  # in any case: on a Mac's
    # disk Steps/ is steps/ and readme.md is README.md
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{re.escape(str(ROOT / out))} is the project's own: what "
                                                          "a command makes goes elsewhere"):
        kind(str(ROOT / out))


def test_a_file_of_your_own_in_the_projects_root_is_an_out_like_any_other():
    mine = ROOT / f"curves-{os.getpid()}.svg"  # make curves --out curves.svg: a name no one has used
    assert cli.out_file(str(mine)) == mine and not mine.exists()  # checked, not made


def test_an_empty_out_file_is_refused_not_read_as_the_directory_it_runs_in():
    with pytest.raises(argparse.ArgumentTypeError, match="^expected a file name, got '' \\(e.g. results.json\\)$"):
        cli.out_file("")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="Linux's /proc: there, but no file can be made in it")
def test_an_out_in_a_directory_where_no_file_can_be_made_is_refused_saying_so():
    with pytest.raises(argparse.ArgumentTypeError, match=r"^cannot write to /proc: a file cannot be made in it \("):
        cli.out_file("/proc/r.json")  # /proc is there: "cannot write to /proc (No such file...)" read as if it were not


def test_an_out_file_is_refused_where_it_names_a_directory_and_its_directory_is_made(tmp_path):
    assert cli.out_file(str(tmp_path / "a" / "r.json")) == tmp_path / "a" / "r.json" and (tmp_path / "a").is_dir()
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory; give a file name"):
        cli.out_file(str(tmp_path))
    with pytest.raises(argparse.ArgumentTypeError, match="cannot write to /proc/forbidden"):
        cli.out_file("/proc/forbidden/r.json")


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_shows_the_presets_values_as_the_defaults_however_it_is_asked_for(flag, capsys):
    p = cli.ArgumentParser(prog="x", formatter_class=cli.HelpFormatter)
    p.add_argument("--preset", default="auto")
    p.add_argument("--width", type=int, help="the width")
    with pytest.raises(SystemExit):
        cli.parse_with_preset(p, [flag], {"tiny": {"width": 3}}, lambda args: "tiny")
    assert "the width (default: 3)" in capsys.readouterr().out


@pytest.mark.parametrize("argv, preset, width", [
    ([], "tiny", 3),  # auto: the preset pick() chooses
    (["--preset", "big"], "big", 9),  # a preset given wins over pick()
    (["--preset", "big", "--width", "5"], "big", 5),  # and a flag given wins over its preset
])
def test_a_preset_given_wins_over_the_picked_one_and_a_flag_given_over_the_preset(argv, preset, width):
    p = cli.ArgumentParser(prog="x")
    p.add_argument("--preset", default="auto")
    p.add_argument("--width", type=int)
    args = cli.parse_with_preset(p, argv, {"tiny": {"width": 3}, "big": {"width": 9}}, lambda args: "tiny")
    assert (args.preset, args.width) == (preset, width)


@pytest.mark.parametrize("typed", ["--max-step", "--max-stpes", "--max-step=3"])  # argparse alone ran --max-step
def test_a_shortened_or_misspelt_flag_is_refused_with_the_flag_it_may_mean(typed, capsys):
    p = cli.ArgumentParser(prog="x")
    p.add_argument("--max-steps", type=int)
    with pytest.raises(SystemExit) as exit:
        p.parse_args([typed, "3"] if "=" not in typed else [typed])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"unrecognized arguments: {typed}" in err and "(did you mean --max-steps?)" in err


@pytest.mark.parametrize("typed, meant", [
    ("--warmup", "--warmup-steps"),  # shortened: the one flag it begins
    ("--max", "--max-steps or --max-new-tokens"),  # the flags it begins, in the order --help lists them
    ("--max-new-tokes", "--max-new-tokens"),  # misspelt
])
def test_a_shortened_flag_gets_every_flag_it_begins_and_a_misspelt_one_the_nearest(typed, meant, capsys):
    p = cli.ArgumentParser(prog="x")
    for flag in ("--max-steps", "--warmup-steps", "--max-new-tokens"):
        p.add_argument(flag, type=int)
    with pytest.raises(SystemExit):
        p.parse_args([typed, "3"])
    assert f"unrecognized arguments: {typed} 3 (did you mean {meant}?)" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["Hi!", "$HOME", "a`b`", "a\\b"])
def test_make_args_puts_a_value_a_terminal_would_expand_in_single_quotes(value):
    # in double quotes a terminal still acts on $, ` and a backslash, and an interactive bash on ! (its history)
    args = cli.make_args(["--prompt", value])
    assert args.startswith("ARGS='") and shlex.split(shlex.split(args)[0].split("=", 1)[1]) == ["--prompt", value]


def test_make_args_puts_a_value_with_an_apostrophe_in_escaped_double_quotes():
    assert cli.make_args(["--prompt", "I'm here", "--out", "runs/a b"]) == \
        'ARGS="--prompt \\"I\'m here\\" --out \'runs/a b\'"'


@pytest.mark.parametrize("typed", [["--zzz"], ["--max-stepz-and-more", "3"], ["--he"]])  # "--he": not --help either
def test_an_unknown_flag_near_no_flag_is_refused_without_a_guess(typed, capsys):
    p = cli.ArgumentParser(prog="x")
    p.add_argument("--max-steps", type=int)
    with pytest.raises(SystemExit) as exit:
        p.parse_args(typed)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"unrecognized arguments: {' '.join(typed)}" in err and "did you mean" not in err


@pytest.mark.parametrize("typed", [[""], [" "], ["3"]])  # argparse's line then ends in nothing, or in no --flag
def test_an_unknown_argument_that_is_no_flag_is_refused_in_one_line(typed, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.ArgumentParser(prog="x").parse_args(typed)
    assert exit.value.code == 2 and "error: unrecognized arguments:" in capsys.readouterr().err


@pytest.mark.parametrize("typed, said", [
    (["--prompt", "To", "be", "or", "not"],
     "be or not (a value of several words goes in quotes: --prompt 'To be or not')"),
    (["--prompt", "I'm", "here"], "here (a value of several words goes in quotes: --prompt \"I'm here\")"),
    (["--json", "my", "runs.json"], "runs.json (a value of several words goes in quotes: --json 'my runs.json')"),
    (["--max-steps", "3", "4"], "4"),  # a number of two words is no number: no quotes to advise
    (["--device", "cpu", "extra"], "extra"),  # nor a choice
    (["3", "--prompt", "To"], "3"),  # a word after no flag
])
def test_the_words_after_a_flags_value_are_answered_with_the_value_quoted(typed, said, capsys):
    p = cli.ArgumentParser(prog="x")
    p.add_argument("--prompt")
    p.add_argument("--json", type=cli.out_file)  # a path: it may have a space
    p.add_argument("--max-steps", type=int)
    p.add_argument("--device", choices=["cpu", "cuda"])
    with pytest.raises(SystemExit):
        p.parse_args(typed)
    assert capsys.readouterr().err.splitlines()[0] == f"x: error: unrecognized arguments: {said}"


def test_a_flag_of_later_steps_typed_in_an_earlier_one_names_the_steps_that_have_it(capsys):
    p = cli.parser("doc", "12_compile_flash", max_steps=5)
    with pytest.raises(SystemExit):
        p.parse_args(["--warmup-steps", "5"])
    assert "unrecognized arguments: --warmup-steps 5 (--warmup-steps is a flag of steps 14 to 18)" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("name, typed, said", [
    ("02_attention", "--n-head", "(here it is --n-heads; --n-head is a flag of steps 08, 10 to 18)"),
    ("08_gpt2", "--d-model", "(here it is --n-embd; --d-model is a flag of steps 01 to 07)"),  # GPT-2's names
    ("03_feedforward", "--d_ff", "(did you mean --d-ff?)"),  # an underscore for a hyphen
    ("09_from_pretrained", "--max-steps", "(--max-steps is a flag of steps 01 to 08, 10 to 18)"),  # from cli.parser
])
def test_a_flag_of_another_step_gets_this_steps_name_for_it_and_the_steps_that_have_it(name, typed, said, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(f"steps.{name}.__main__").main([typed, "4"])
    assert f"unrecognized arguments: {typed} 4 {said}" in capsys.readouterr().err


def test_the_no_form_of_a_switch_is_found_in_the_steps_that_have_the_switch():
    assert cli.steps_with_flag("--no-cache") == cli.steps_with_flag("--cache") == ["18_kv_cache"]


@pytest.mark.parametrize("numbers, said", [([14, 15, 16, 17, 18], "14 to 18"), ([17, 18], "17 and 18"), ([9], "09"),
                                           ([8, 10, 11, 12], "08, 10 to 12")])
def test_steps_are_named_as_runs_of_neighbours(numbers, said):
    assert cli.spans([f"{n:02d}_x" for n in numbers]) == said


def test_the_last_parse_records_the_flags_given_so_a_default_can_be_told_from_the_same_value_given():
    p = cli.ArgumentParser(prog="x")
    p.add_argument("--out", default="runs/x")
    p.add_argument("--seed", type=int)
    p.parse_args(["--out=runs/x", "--seed", "3"])
    assert p.given == {"--out", "--seed"}
    p.parse_args([])
    assert p.given == set()


def test_a_flag_left_to_auto_shows_no_default_in_its_help_a_learner_cannot_type_auto():
    p = cli.ArgumentParser(prog="x", formatter_class=cli.HelpFormatter)
    p.add_argument("--compile", default="auto", action=argparse.BooleanOptionalAction, help="compile")
    p.add_argument("--shuffle", default=True, action=argparse.BooleanOptionalAction, help="shuffle")
    help = " ".join(p.format_help().split())
    assert "(default: auto)" not in help and "shuffle (default: True)" in help


def test_shapes_name_a_shared_module_after_the_parent_running_it(capsys):
    shared = torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(torch.nn.Sequential(shared), torch.nn.Sequential(shared))
    shapes.show(model, torch.zeros(1, 2))
    out = capsys.readouterr().out
    assert "0.0 " in out and "1.0 " in out  # not 0.0 twice


def two_levels() -> torch.nn.Module:
    """Modules 0 (0.0, 0.1) and 1: two levels of names."""
    return torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()), torch.nn.Linear(3, 1))


def test_shapes_at_depth_1_show_the_models_own_modules_and_none_of_theirs():
    assert [name for name, _, _ in shapes.rows(two_levels(), torch.zeros(1, 2), depth=1)] == ["input 0", "0", "1"]


def test_shapes_come_in_the_order_the_modules_finish_a_parent_after_its_children():
    assert shapes.rows(two_levels(), torch.zeros(1, 2), depth=2) == [
        ("input 0", "", (1, 2)), ("0.0", "Linear", (1, 3)), ("0.1", "ReLU", (1, 3)), ("0", "Sequential", (1, 3)),
        ("1", "Linear", (1, 1))]


def test_shapes_list_every_input_of_a_model_that_takes_two():
    # step 05's decoder and step 06's transformer take (source, target)
    bilinear = torch.nn.Bilinear(2, 3, 1)  # no module inside: the model's own output has no row
    assert shapes.rows(bilinear, torch.zeros(4, 2), torch.zeros(4, 3)) == [("input 0", "", (4, 2)),
                                                                          ("input 1", "", (4, 3))]


def test_shapes_leave_no_hook_on_the_model():
    model = two_levels()  # a hook left on would record every training forward after it, and slow each one
    shapes.rows(model, torch.zeros(1, 2))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_shapes_print_a_row_a_module_in_columns_of_name_type_and_shape(capsys):
    shapes.show(two_levels(), torch.zeros(1, 2), depth=1)
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"  {'input 0':<24} {'':<20} (1, 2)", f"  {'0':<24} {'Sequential':<20} (1, 3)",
        f"  {'1':<24} {'Linear':<20} (1, 1)"]


def test_the_shapes_say_how_many_rows_they_were_taken_on(capsys):
    # a trainer shows 4 windows of its batch of 8: the header must not leave (4, 64, ...) against "batch 8" a puzzle
    shapes.show(torch.nn.Linear(2, 3), torch.zeros(4, 2))
    assert capsys.readouterr().out.splitlines()[0] == ("shapes through one forward pass of 4 rows (a training batch "
                                                       "may have more):")
    shapes.show(torch.nn.Linear(2, 3), torch.zeros(1, 2))  # --batch-size 1
    assert capsys.readouterr().out.splitlines()[0].startswith("shapes through one forward pass of 1 row (")
