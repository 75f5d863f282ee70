"""make gpu-check: every accelerator path in one command, and one summary of what passed, failed or was skipped.

On a machine with a CUDA GPU it runs, within 8 minutes in all, (1) the tests marked gpu (tests/test_gpu.py: TF32
and bf16, the flash kernel, torch.compile, fused AdamW, checkpoints across devices, pinned memory, the padded
vocabulary, NCCL), (2) 5 eager iterations of every trainer step at the gpt2 preset, one micro-batch each (the
loss finite and falling; the peak memory; compiling is the tests' and the bench's to check) and (3) a reduced make
bench (steps 10, 12, 15 and transformers' GPT-2, compiled) with the MFU against the card's datasheet, and writes
runs/gpu-check.json. What the 8 minutes do not reach is reported as skipped. Without a CUDA device it says so in
one line and exits 0.
"""
import argparse
import importlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from shared import cli
from shared.steps import ROOT

# A step run in a process of its own, printing the peak GPU memory as its last line.
PEAK = ("import atexit, runpy, sys, torch; sys.argv = ['{0}', *sys.argv[1:]]; "
        "atexit.register(lambda: print('peak-mb', torch.cuda.max_memory_allocated() / 2**20)); "
        "runpy.run_module('steps.{0}', run_name='__main__')")


BUDGET_S = 8 * 60  # all of it: a GPU rented by the minute runs it twice in a quarter of an hour
TESTS_S, RUN_S = 150, 30  # at most, for the tests marked gpu and for each short run; the bench has what is left
OUT_OF_TIME = "the 8 minutes were spent before it"


def within(cmd: list[str], seconds: float, capture: bool = False) -> subprocess.CompletedProcess | None:
    """cmd as a process of its own; None when it is not done within `seconds`. Then, and on Ctrl-C, it is killed
    with every process it started (torchrun's ranks, the bench's workers), which would hold the GPU otherwise."""
    proc = subprocess.Popen(cmd, cwd=ROOT, text=True, stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.PIPE if capture else None)
    try:
        out, err = proc.communicate(timeout=seconds)
    except BaseException as e:  # subprocess.TimeoutExpired, or KeyboardInterrupt
        for pid in [*descendants(proc.pid), proc.pid]:  # torchrun starts each rank in a session of its own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            return None
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def descendants(pid: int) -> list[int]:
    """The processes pid started, and theirs, and so on (from /proc: Linux, where CUDA machines are)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(name)", which may hold spaces
        except OSError:  # gone meanwhile
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    found, new = [], [pid]
    while new:
        new = [p for p, pp in parent.items() if pp in new]
        found += new
    return found


def test_results(xml: Path) -> list[dict]:
    """One row a test from pytest's JUnit XML: name, and passed, failed or skipped (with why)."""
    rows = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        status = "failed" if bad is not None else "skipped" if skipped is not None else "passed"
        why = (bad if bad is not None else skipped).get("message", "")[:200] if status != "passed" else ""
        rows.append({"check": case.get("name"), "status": status, "why": why})
    return rows


def short_run(step: str, out: Path, seconds: float) -> dict:
    """5 eager iterations at the gpt2 preset: the loss finite and falling, and the peak memory."""
    text = (ROOT / "steps" / step / "__main__.py").read_text()
    check = f"{step} --preset gpt2 --max-steps 5"
    flags = ["--preset", "gpt2", "--max-steps", "5", "--device", "cuda", "--log-every", "1", "--out", str(out)]
    flags += ["--val-windows", "16"] if '"--val-windows"' in text else []
    flags += ["--no-compile"] if '"--compile"' in text else []  # 30-60 s a step to compile: not in 8 minutes
    flags += ["--warmup-steps", "1"] if '"--warmup-steps"' in text else []  # the preset's 715 would keep lr near 0
    if '"--total-batch-size"' in text:  # one micro-batch an iteration: the same peak memory, 8-32 times quicker
        preset = importlib.import_module(f"steps.{step}.__main__").PRESETS["gpt2"]
        flags += ["--total-batch-size", str(preset["batch_size"] * preset["seq_len"])]
    if seconds < 1:
        return {"check": check, "status": "skipped", "why": OUT_OF_TIME}
    start = time.perf_counter()
    r = within([sys.executable, "-c", PEAK.format(step), *flags], seconds, capture=True)
    losses = losses_in(out / "metrics.jsonl")
    shutil.rmtree(out, ignore_errors=True)  # its checkpoint and model/: 2 GB a step
    if r is None:  # cut off: at its own limit it failed; at the budget's end it was not given its time
        return {"check": check, "status": "failed" if seconds >= RUN_S else "skipped",
                "why": f"not done in {seconds:.0f} s" + ("" if seconds >= RUN_S else ", all the 8 minutes had left"),
                "losses": losses}
    peak = next((float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("peak-mb")), math.nan)
    ok = r.returncode == 0 and len(losses) == 5 and all(x is not None for x in losses) and losses[-1] < losses[0]
    said = (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
    why = "" if ok else said if r.returncode else f"exit 0, but the losses were {losses}"
    return {"check": check, "status": "passed" if ok else "failed", "why": why, "losses": losses,
            "peak_mb": round(peak) if math.isfinite(peak) else None, "seconds": round(time.perf_counter() - start)}


def losses_in(metrics: Path) -> list:
    """The training losses a run logged (None for a nan); a line cut off by a killed run is left out."""
    losses = []
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "loss" in row:
            losses.append(row["loss"])
    return losses


def summary(rows: list[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("passed", "failed", "skipped")}
    lines = [f"  {r['status']:<8} {r['check']}" + (f"  ({r['why']})" if r["why"] else "") for r in rows
             if r["status"] != "passed"]
    return f"make gpu-check: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped" + \
        ("\n" + "\n".join(lines) if lines else "")


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="make gpu-check", description=__doc__.split("\n\n")[0], hint='make gpu-check '
                           'ARGS="--help"')
    p.add_argument("--json", type=Path, default="runs/gpu-check.json", help="where the results go (default: "
                   "runs/gpu-check.json)")
    p.add_argument("--tests-only", action="store_true", help="only the tests marked gpu (2.5 minutes at most)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        print("make gpu-check: no CUDA device here (torch.cuda.is_available() is False)"
              + (", and the MPS device this has is not covered" if mps else "") + ": nothing to check")
        return 0
    try:  # checked here, not by argparse: without a GPU nothing is written, not even runs/
        cli.out_file(str(args.json))
    except argparse.ArgumentTypeError as e:
        p.error(f"argument --json: {e}")
    from shared.bench import trainer_steps

    card = torch.cuda.get_device_name(0)
    print(f"make gpu-check on {torch.cuda.device_count()} x {card}, torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}; {BUDGET_S // 60} minutes at most", flush=True)
    deadline = time.monotonic() + BUDGET_S

    def left() -> float:
        return deadline - time.monotonic()
    rows, ladder = [], None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            xml = Path(tmp) / "gpu.xml"
            seconds = min(TESTS_S, left())
            if within([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", f"--junitxml={xml}"],
                      seconds) is None:
                rows.append({"check": "the tests marked gpu", "status": "failed", "why": f"not done in {seconds:.0f} "
                             "s: the tests' results are lost"})
            rows += test_results(xml) if xml.exists() else []
            if not args.tests_only:
                for step in trainer_steps():
                    rows.append(short_run(step, Path(tmp) / step, min(RUN_S, left())))
                    print(f"  {rows[-1]['status']:<8} {rows[-1]['check']}", flush=True)
                bench, seconds = Path(tmp) / "bench.json", left()
                check = "make bench --steps 10,12,15 (and hf_gpt2)"
                if seconds < 1:
                    rows.append({"check": check, "status": "skipped", "why": OUT_OF_TIME})
                else:
                    r = within([sys.executable, "-m", "shared.bench", "--steps", "10,12,15", "--iters", "5",
                                "--warmup", "3", "--rounds", "1", "--json", str(bench)], seconds)
                    ladder = json.loads(bench.read_text()) if r and r.returncode == 0 and bench.exists() else None
                    if r is None:
                        rows.append({"check": check, "status": "skipped",
                                     "why": f"not done in the {seconds:.0f} s the 8 minutes had left"})
                    else:
                        rows.append({"check": check, "status": "passed" if ladder else "failed",
                                     "why": "" if ladder else f"exit {r.returncode}: its output is above"})
    except KeyboardInterrupt:
        print("make gpu-check: interrupted; nothing written", file=sys.stderr)
        return 130
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "card": card, "gpus": torch.cuda.device_count(),
                                     "torch": torch.__version__, "cuda": torch.version.cuda, "checks": rows,
                                     "ladder": ladder}, indent=1) + "\n")
    print(summary(rows))
    print(f"results: {args.json}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
