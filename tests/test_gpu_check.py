"""make gpu-check (shared/gpu_check.py): what it runs, what it counts as passed, failed or skipped, what it writes."""
import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from shared import bench, gpu_check

CARD = "NVIDIA H100 80GB HBM3"
LADDER = {"steps": ["10_training"], "mfu": {"10_training": 0.41}}  # as make bench writes it, in brief
BENCH = "make bench --steps 10,12,15 (and hf_gpt2)"
PASSED = '<testcase classname="tests.test_gpu" name="test_tf32_is_on"/>'
FAILED = '<testcase classname="tests.test_gpu" name="test_fused_adamw"><failure message="assert False"/></testcase>'


def junit(xml: Path, *cases: str) -> Path:
    """A JUnit XML as pytest --junitxml writes it, with these <testcase> elements."""
    xml.write_text(f'<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">{"".join(cases)}'
                   "</testsuite></testsuites>")
    return xml


@pytest.fixture
def h100(monkeypatch) -> list[str]:
    """torch as on one H100, one trainer step, and short runs that pass; returns the steps given a short run."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: CARD)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(bench, "trainer_steps", lambda: ["10_training"])
    runs = []

    def short_run(step, out, seconds):
        runs.append(step)
        return {"check": f"{step} --preset gpt2 --max-steps 5", "status": "passed", "why": ""}
    monkeypatch.setattr(gpu_check, "short_run", short_run)
    return runs


def checks(monkeypatch, tests=(PASSED,), bench_exit=0) -> list[tuple[list[str], float]]:
    """within as the tests marked gpu (their JUnit XML holds `tests`) and as the bench (it writes LADDER, then exits
    bench_exit); returns each command it was given, with its seconds."""
    asked = []

    def within(cmd, seconds, capture=False):
        asked.append((cmd, seconds))
        if cmd[2] == "pytest":
            junit(Path(next(a for a in cmd if a.startswith("--junitxml=")).split("=", 1)[1]), *tests)
            return subprocess.CompletedProcess(cmd, int(FAILED in tests))
        Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps(LADDER))
        return subprocess.CompletedProcess(cmd, bench_exit)
    monkeypatch.setattr(gpu_check, "within", within)
    return asked


def a_run(monkeypatch, rows, returncode=0, stderr="") -> list[list[str]]:
    """within as a short run that logged these metrics.jsonl rows, printed its peak memory and exited returncode;
    returns the commands it was given."""
    asked = []

    def within(cmd, seconds, capture=False):
        asked.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir()
        (out / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        return subprocess.CompletedProcess(cmd, returncode, "iter 4 | loss 7.1000\npeak-mb 30720.4\n", stderr)
    monkeypatch.setattr(gpu_check, "within", within)
    return asked


FALLING = [{"iter": i, "loss": 10.9 - i} for i in range(5)]


def test_make_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make gpu-check runs the checks instead")
    r = subprocess.run(["make", "-s", "gpu-check", "ARGS="], capture_output=True, text=True, timeout=300)
    mps = ", and the MPS device this has is not covered" if torch.backends.mps.is_available() else ""  # a Mac's
    assert r.returncode == 0 and r.stdout.strip().splitlines() == [
        f"make gpu-check: no CUDA device here (torch.cuda.is_available() is False){mps}: nothing to check"]


def test_gpu_check_without_a_gpu_writes_nothing_not_even_the_json_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--json", str(tmp_path / "runs" / "gpu-check.json")]) == 0
    assert not (tmp_path / "runs").exists()


def test_gpu_check_on_a_gpu_refuses_an_unwritable_json_before_any_check(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the --json check comes before any GPU call
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--json", str(tmp_path / "a_file" / "gpu-check.json")])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[0] == (f"make gpu-check: error: argument --json: "
                                                       f"{tmp_path / 'a_file'} is a file, not a directory")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="gpu_check finds a command's processes in Linux's /proc")
def test_a_gpu_check_that_runs_out_of_time_kills_the_processes_its_command_started(tmp_path):
    child = tmp_path / "child.pid"  # a grandchild in a session of its own, as torchrun starts its ranks
    spawn = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             f"time.sleep(60)'], start_new_session=True); open({str(child)!r}, 'w').write(str(p.pid)); "
             "time.sleep(60)")
    start = time.monotonic()
    assert gpu_check.within([sys.executable, "-c", spawn], 4) is None
    assert time.monotonic() - start < 30
    pid = int(child.read_text())  # written within the 4 s: python starts in well under 1 s
    for _ in range(40):  # the kill is sent; the kernel takes a moment to end it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        with contextlib.suppress(FileNotFoundError):  # reaped since: the next look finds it gone
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":  # ended, not yet reaped
                break
        time.sleep(0.05)
    else:
        pytest.fail(f"process {pid} outlived the check that started it")


def test_a_gpu_checks_short_run_reports_the_losses_of_a_crashed_run_and_no_peak(tmp_path, monkeypatch):
    def crashed(cmd, seconds, capture=False):  # a run killed by a signal: no peak line, a line cut off
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"iter": 0, "loss": 10.9}\n{"iter": 1, "loss": 9.5}\n{"iter": 2, "lo')
        return subprocess.CompletedProcess(cmd, -9, "", "")
    monkeypatch.setattr(gpu_check, "within", crashed)
    row = gpu_check.short_run("17_fineweb_hellaswag", tmp_path / "run", 40)
    assert row["status"] == "failed" and row["losses"] == [10.9, 9.5] and row["peak_mb"] is None


def test_a_gpu_checks_short_run_is_eager_warms_up_1_step_evaluates_16_windows_and_takes_one_micro_batch(
        tmp_path, monkeypatch):
    asked = a_run(monkeypatch, FALLING)
    gpu_check.short_run("17_fineweb_hellaswag", tmp_path / "run", 30)
    cmd = asked[0]
    assert "--no-compile" in cmd and cmd[cmd.index("--warmup-steps") + 1] == "1"
    assert cmd[cmd.index("--val-windows") + 1] == "16"  # not the preset's 1,280 at each evaluation
    assert cmd[cmd.index("--total-batch-size") + 1] == str(64 * 1024)  # one micro-batch of the preset's B x T


def test_a_gpu_checks_short_run_keeps_no_checkpoint_or_model(tmp_path, monkeypatch):
    a_run(monkeypatch, FALLING)
    gpu_check.short_run("10_training", tmp_path / "run", 30)
    assert not (tmp_path / "run").exists()


def test_a_gpu_checks_short_run_with_no_time_left_is_skipped_and_says_why(tmp_path):
    row = gpu_check.short_run("10_training", tmp_path / "run", 0)
    assert row == {"check": "10_training --preset gpt2 --max-steps 5", "status": "skipped",
                   "why": gpu_check.OUT_OF_TIME}


def test_the_gpu_check_summary_names_what_failed_and_what_was_skipped_and_why():
    rows = [{"check": "a", "status": "passed", "why": ""}, {"check": "b", "status": "failed", "why": "boom"},
            {"check": "c", "status": "skipped", "why": "one GPU"}]
    assert gpu_check.summary(rows).splitlines() == ["make gpu-check: 1 passed, 1 failed, 1 skipped",
                                                    "  failed   b  (boom)", "  skipped  c  (one GPU)"]


def test_a_gpu_check_with_a_failed_check_exits_1(tmp_path, monkeypatch, h100):
    checks(monkeypatch, tests=(PASSED, FAILED))
    assert gpu_check.main(["--json", str(tmp_path / "gpu-check.json")]) == 1


def test_a_gpu_check_writes_the_card_the_versions_each_check_and_the_ladder_to_its_json(tmp_path, monkeypatch, h100):
    checks(monkeypatch)
    assert gpu_check.main(["--json", str(tmp_path / "gpu-check.json")]) == 0
    written = json.loads((tmp_path / "gpu-check.json").read_text())
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", written.pop("date"))
    assert written == {"card": CARD, "gpus": 1, "torch": torch.__version__, "cuda": "12.4", "checks": [
        {"check": "test_tf32_is_on", "status": "passed", "why": ""},
        {"check": "10_training --preset gpt2 --max-steps 5", "status": "passed", "why": ""},
        {"check": BENCH, "status": "passed", "why": ""}], "ladder": LADDER}


@pytest.mark.parametrize("flags, runs, commands", [([], ["10_training"], ["pytest", "shared.bench"]),
                                                   (["--tests-only"], [], ["pytest"])], ids=["all", "tests-only"])
def test_gpu_check_runs_the_short_runs_and_the_bench_unless_tests_only(tmp_path, monkeypatch, h100, flags, runs,
                                                                     commands):
    asked = checks(monkeypatch)
    gpu_check.main(["--json", str(tmp_path / "gpu-check.json"), *flags])
    assert h100 == runs and [cmd[2] for cmd, _ in asked] == commands  # python -m pytest, python -m shared.bench


def test_a_bench_that_exits_non_zero_failed_even_if_it_wrote_its_json(tmp_path, monkeypatch, h100):
    checks(monkeypatch, bench_exit=1)
    assert gpu_check.main(["--json", str(tmp_path / "gpu-check.json")]) == 1
    written = json.loads((tmp_path / "gpu-check.json").read_text())
    assert written["checks"][-1] == {"check": BENCH, "status": "failed", "why": "exit 1: its output is above"}
    assert written["ladder"] is None


@pytest.mark.parametrize("spent, given", [(0, 150), (400, 80)])
def test_the_tests_marked_gpu_get_150_s_at_most_and_no_more_than_the_8_minutes_have_left(tmp_path, monkeypatch, h100,
                                                                                       spent, given):
    clock = itertools.chain([0], itertools.repeat(spent))  # the start, then `spent` seconds later
    monkeypatch.setattr(gpu_check, "time", SimpleNamespace(monotonic=lambda: next(clock), strftime=time.strftime))
    asked = checks(monkeypatch)
    gpu_check.main(["--json", str(tmp_path / "gpu-check.json"), "--tests-only"])
    assert asked[0][1] == given


def test_a_gpu_test_that_errors_failed(tmp_path):
    xml = junit(tmp_path / "gpu.xml", '<testcase name="test_nccl"><error message="failed on setup"/></testcase>')
    assert gpu_check.test_results(xml) == [{"check": "test_nccl", "status": "failed", "why": "failed on setup"}]


def test_a_skipped_gpu_test_is_reported_skipped_with_its_reason(tmp_path):
    xml = junit(tmp_path / "gpu.xml", '<testcase name="test_nccl"><skipped message="needs 2 GPUs"/></testcase>')
    assert gpu_check.test_results(xml) == [{"check": "test_nccl", "status": "skipped", "why": "needs 2 GPUs"}]


def test_a_failed_gpu_tests_message_is_cut_to_200_characters(tmp_path):
    xml = junit(tmp_path / "gpu.xml", f'<testcase name="test_nccl"><failure message="{"x" * 300}"/></testcase>')
    assert gpu_check.test_results(xml)[0]["why"] == "x" * 200


def test_a_gpu_checks_short_run_reads_its_training_losses_past_the_validation_rows(tmp_path, monkeypatch):
    a_run(monkeypatch, [{"iter": 0, "loss": 10.9}, {"iter": 0, "val_loss": 10.8}, {"iter": 1, "loss": 9.5},
                        {"iter": 2, "loss": 8.8}, {"iter": 3, "loss": 7.9}, {"iter": 4, "loss": 7.1},
                        {"iter": 4, "val_loss": 7.3}])
    assert gpu_check.short_run("10_training", tmp_path / "run", 30)["losses"] == [10.9, 9.5, 8.8, 7.9, 7.1]


def test_a_gpu_checks_short_run_that_logged_5_falling_losses_passed_and_records_its_peak_memory(tmp_path,
                                                                                                 monkeypatch):
    a_run(monkeypatch, FALLING)  # its last line: peak-mb 30720.4
    row = gpu_check.short_run("10_training", tmp_path / "run", 30)
    assert row["status"] == "passed" and row["peak_mb"] == 30720


def test_a_gpu_checks_short_run_that_logged_3_losses_of_5_failed_and_says_its_losses(tmp_path, monkeypatch):
    a_run(monkeypatch, [{"iter": 0, "loss": 10.9}, {"iter": 1, "loss": 9.5}, {"iter": 2, "loss": 8.8}])
    row = gpu_check.short_run("10_training", tmp_path / "run", 30)
    assert row["status"] == "failed" and row["why"] == "exit 0, but the losses were [10.9, 9.5, 8.8]"


def test_a_gpu_checks_short_run_that_exits_non_zero_says_the_last_line_of_its_errors(tmp_path, monkeypatch):
    a_run(monkeypatch, FALLING, returncode=1,  # its losses were fine
          stderr="Traceback (most recent call last):\n  ...\ntorch.OutOfMemoryError: CUDA out of memory.\n")
    row = gpu_check.short_run("10_training", tmp_path / "run", 30)
    assert row["status"] == "failed" and row["why"] == "torch.OutOfMemoryError: CUDA out of memory."


@pytest.mark.parametrize("seconds, status, why", [
    (30, "failed", "not done in 30 s"),  # its own limit
    (12, "skipped", "not done in 12 s, all the 8 minutes had left")])  # the 8 minutes' end
def test_a_gpu_checks_short_run_cut_off_at_its_limit_failed_and_at_the_budgets_end_is_skipped(tmp_path, monkeypatch,
                                                                                              seconds, status, why):
    def cut_off(cmd, limit, capture=False):
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir()
        (out / "metrics.jsonl").write_text('{"iter": 0, "loss": 10.9}\n')
        return None
    monkeypatch.setattr(gpu_check, "within", cut_off)
    row = gpu_check.short_run("10_training", tmp_path / "run", seconds)
    assert row == {"check": "10_training --preset gpt2 --max-steps 5", "status": status, "why": why, "losses": [10.9]}


def test_ctrl_c_during_a_gpu_check_kills_its_command_and_is_not_taken_for_a_timeout(monkeypatch):
    procs = []

    class CtrlC(subprocess.Popen):  # Ctrl-C while the command runs
        def communicate(self, *args, timeout=None, **kwargs):
            procs.append(self)
            if timeout is not None:
                raise KeyboardInterrupt
            return super().communicate(*args, **kwargs)
    monkeypatch.setattr(subprocess, "Popen", CtrlC)
    with pytest.raises(KeyboardInterrupt):
        gpu_check.within(["sleep", "60"], 30)
    assert procs[0].returncode == -signal.SIGKILL
