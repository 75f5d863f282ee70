"""make gpu-check: every accelerator path in one command, and one summary of what passed, failed or was skipped.

On a machine with a CUDA GPU it runs, each with a time limit, (1) the tests marked gpu (tests/test_gpu.py: TF32 and
bf16, the flash kernel, torch.compile, fused AdamW, checkpoints across devices, pinned memory, the padded vocabulary,
NCCL), (2) 5 iterations of every trainer step at the gpt2 preset (the loss finite and falling; the peak memory) and
(3) a reduced make bench (steps 10, 12, 15 and transformers' GPT-2) with the MFU against the card's datasheet, and
writes runs/gpu-check.json. Without a CUDA device it says so in one line and exits 0.
"""
import json
import math
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


def short_run(step: str, out: Path) -> dict:
    """5 iterations at the gpt2 preset: the loss finite and falling, and the peak memory."""
    text = (ROOT / "steps" / step / "__main__.py").read_text()
    flags = ["--preset", "gpt2", "--max-steps", "5", "--device", "cuda", "--log-every", "1", "--out", str(out)]
    flags += ["--val-windows", "16"] if '"--val-windows"' in text else []
    start = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-c", PEAK.format(step), *flags], cwd=ROOT, capture_output=True,
                           text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return {"check": f"{step} --preset gpt2 --max-steps 5", "status": "failed", "why": "over 240 s"}
    losses = [row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if "loss" in row] if (out / "metrics.jsonl").exists() else []
    peak = next((float(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("peak-mb")), math.nan)
    ok = r.returncode == 0 and len(losses) == 5 and all(x is not None for x in losses) and losses[-1] < losses[0]
    why = "" if ok else (r.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return {"check": f"{step} --preset gpt2 --max-steps 5", "status": "passed" if ok else "failed", "why": why,
            "losses": losses, "peak_mb": round(peak), "seconds": round(time.perf_counter() - start)}


def summary(rows: list[dict]) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("passed", "failed", "skipped")}
    lines = [f"  {r['status']:<8} {r['check']}" + (f"  ({r['why']})" if r["why"] else "") for r in rows
             if r["status"] != "passed"]
    return f"make gpu-check: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped" + \
        ("\n" + "\n".join(lines) if lines else "")


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="make gpu-check", description=__doc__.split("\n\n")[0], hint='make gpu-check '
                           'ARGS="--help"')
    p.add_argument("--json", type=cli.out_file, default="runs/gpu-check.json", help="where the results go")
    p.add_argument("--tests-only", action="store_true", help="only the tests marked gpu (a minute or two)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        mps = getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
        print("make gpu-check: no CUDA device here (torch.cuda.is_available() is False)"
              + (", and the MPS device this has is not covered" if mps else "") + ": nothing to check")
        return 0
    from shared.bench import trainer_steps

    card = torch.cuda.get_device_name(0)
    print(f"make gpu-check on {torch.cuda.device_count()} x {card}, torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}", flush=True)
    rows, ladder = [], None
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "gpu.xml"
        try:
            subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q",
                            f"--junitxml={xml}"], cwd=ROOT, timeout=240)
        except subprocess.TimeoutExpired:
            rows.append({"check": "the tests marked gpu", "status": "failed", "why": "over 240 s"})
        rows += test_results(xml) if xml.exists() else []
        if not args.tests_only:
            for step in trainer_steps():
                rows.append(short_run(step, Path(tmp) / step))
                print(f"  {rows[-1]['status']:<8} {rows[-1]['check']}", flush=True)
            bench = Path(tmp) / "bench.json"
            try:
                subprocess.run([sys.executable, "-m", "shared.bench", "--steps", "10,12,15", "--iters", "5",
                                "--warmup", "3", "--rounds", "1", "--json", str(bench)], cwd=ROOT, timeout=240)
                ladder = json.loads(bench.read_text()) if bench.exists() else None
            except subprocess.TimeoutExpired:
                pass
            rows.append({"check": "make bench --steps 10,12,15 (and hf_gpt2)", "status": "passed" if ladder else
                         "failed", "why": "" if ladder else "no bench.json"})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "card": card, "gpus": torch.cuda.device_count(),
                                     "torch": torch.__version__, "cuda": torch.version.cuda, "checks": rows,
                                     "ladder": ladder}, indent=1) + "\n")
    print(summary(rows))
    print(f"results: {args.json}")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
