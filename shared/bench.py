"""make bench: the speed ladder of the trainer steps, beside transformers' GPT-2, against the machine's limit.

    make bench                                   steps 10-16, GPT-2 124M (the gpt2 preset); on a CPU B=1, T=1024
    make bench ARGS="--steps 10,15 --rounds 1"   steps 10 and 15 (and hf_gpt2, and the control), one round
    make bench ARGS="--steps all"                every trainer step, 17 and 18 too
    make bench ARGS="--no-compile"               the eager ladder
    make bench ARGS="--rounds 4"                 twice a CPU's rounds, for two runs that must agree within 5% a row
    make bench ARGS="--compare A.json B.json"    two runs' rows side by side (their --json files)

The default rows are steps 10 to 16. 17 and 18 train as 16 does on one process (their lessons are the data and
generation: make bench ARGS=--generate times 18's), and leaving them out keeps the default run within 15 minutes on
2 slow cores. Each row is one training iteration (forward, backward, the step's clipping if it has any, optimizer
step) on one micro-batch. A step's row runs that step's own training loop (its main(), with its own defaults on
this device), with validation, checkpoints, export and the sample left out; each run is a process of its own, so
that no setting (TF32, threads) leaks into the next. The reference row, hf_gpt2, trains
transformers.GPT2LMHeadModel the way the last step trains its own model. The rows whose step compiles (12 on, and
hf_gpt2) are compiled on every device unless --no-compile; the compile time is reported apart and is not in ms/iter.

The machine's own noise is measured, not assumed away: the rows run in --rounds rounds, every row once a round
(--warmup iterations, then --iters timed ones), in an order rotated by one row a round, so that a slow minute
of the machine falls on different rows in different rounds (a steady drift over the whole run is not taken out:
the clock column shows it). A row's ms/iter is the median of its timed iterations; its spread is the range of its
rounds' medians over that median. The last timed step's row (16 by default) runs once more at the end of every
round, as a control: its two rows differ only by the noise. On a CPU a worker also touches --heap-pad-mb of new heap
after its warm-up and frees it (glibc keeps it): a process's heap keeps growing for many iterations, and each new
page is a page fault that an iteration would otherwise pay for in its ms. The faults of the timed iterations are
counted and printed. And each timed iteration has a clock beside it: a 2048 x 2048 matmul timed just before and just
after it (outside its ms), which shows how fast the machine was then (a row's median is in the clock column).

MFU (model FLOPs utilisation) = FLOPs per token x tokens/s / peak FLOP/s. FLOPs per token = 6N + 12 L H Q T:
6 per parameter (2 forward, 4 backward) plus attention's scores and weighted sums; N counts the parameters
without the position embeddings (GPT-2's 50257-token vocabulary: the padded ids of step 13 are not useful work),
L layers, H heads of Q dimensions, T tokens of context. The peak is the datasheet's dense bf16 on the GPUs this
knows, and on a CPU the median clock of the run (bf16 where the CPU has it, fp32 elsewhere): the iterations' speed
over the matmul's, both at the run's typical moment.
"""
import argparse
import importlib
import json
import math
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared import cli
from shared.steps import ROOT, all_steps, resolve

REFERENCE = "hf_gpt2"
VOCAB = 50257
# dense bf16, NVIDIA's datasheets, by a part of the name torch gives; the NVL cards (not checked here) are unknown
PEAK_TFLOPS = {"NVL": None, "H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312}
RESULT = "bench-result: "  # a worker's last line: this, then its row as JSON
# glibc hands every freed buffer above its mmap threshold (at most 32 MB by default) back to the kernel, and the next
# iteration page-faults it in again: the logits alone are 103 MB in bf16 at B=1, T=1024, and a row took 1.4-1.5x as
# long. The workers keep freed memory for reuse instead (glibc's environment variables; other C libraries ignore
# them). make step does not set them: see docs/bench.md.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}
# Even so, a process's heap keeps growing for a dozen iterations and more (its free pieces no longer fit), and each
# new page is a page fault: one of step 11's timed iterations had 75,248 and took 2,162 ms, against 1,565-1,777 ms
# for those with none (docs/bench.md). On a CPU the workers touch this much new heap after the warm-up and
# free it, and glibc keeps it: see grow_heap.
HEAP_PAD_MB = 2048
LADDER_LAST = 16  # the default rows end here: 17 and 18 train as 16 does on one process
LADDER_ONLY = ("steps", "batch_size", "rounds", "iters", "warmup", "no_compile", "returned_memory", "heap_pad_mb",
               "peak_tflops")  # the flags --generate has no use for


def trainer_steps() -> list[str]:
    """The steps with a training loop to time: those whose __main__.py has --preset (10 on)."""
    return [s for s in all_steps() if '"--preset"' in (ROOT / "steps" / s / "__main__.py").read_text()]


def default_steps() -> list[str]:
    """The ladder make bench times without --steps: the trainer steps up to LADDER_LAST."""
    return [s for s in trainer_steps() if int(s[:2]) <= LADDER_LAST]


def step_list(text: str) -> list[str]:
    """An argparse type: '10,15' -> ['10_training', '15_grad_accum'], each a trainer step; 'all': every one."""
    if text.strip() == "all":
        return trainer_steps()
    if "all" in [n.strip() for n in text.split(",")]:
        raise argparse.ArgumentTypeError(f"{text!r}: all stands alone (every trainer step); or give numbers such as "
                                         "10,15")
    steps = []
    for n in text.split(","):
        if not n.strip():
            raise argparse.ArgumentTypeError(f"{text!r} has an empty step; give numbers such as 10,15, or all")
        try:
            step = resolve(n)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{e}; the trainer steps are {', '.join(trainer_steps())} (or all)")
        if step not in trainer_steps():
            raise argparse.ArgumentTypeError(f"step {step} has no training loop to time; the trainer steps are "
                                             f"{', '.join(trainer_steps())} (or all)")
        if step in steps:
            raise argparse.ArgumentTypeError(f"{text!r} names step {step} twice: a row is timed once a round")
        steps.append(step)
    return steps


def memory_mb() -> int:
    """This machine's memory in MB."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


def heap_pad(text: str) -> int:
    """An argparse type: --heap-pad-mb, from 0 to half this machine's memory (the rest is the model's)."""
    most = memory_mb() // 2
    return cli.checked(int, lambda v: 0 <= v <= most, f"MB from 0 to half this machine's memory, {most:,}")(text)


def bench_json(text: str) -> dict:
    """An argparse type: a bench.json that make bench wrote, read now -> its machine and rows, and its path."""
    try:
        run = json.loads(Path(text).read_text())
    except FileNotFoundError:
        raise argparse.ArgumentTypeError(f"{text}: no such file (make bench writes runs/bench.json, or --json's file)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise argparse.ArgumentTypeError(f"{text} cannot be read as JSON ({e})")
    rows = run.get("rows") if isinstance(run, dict) else None
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and isinstance(r.get("step"), str) and measured(r.get("ms_per_iter"))
            and (r.get("mfu") is None or measured(r["mfu"])) for r in rows):
        raise argparse.ArgumentTypeError(f"{text} is not a ladder that make bench wrote (each row needs a step, its "
                                         "ms_per_iter, a positive number, and its mfu, one or null)")
    steps = [r["step"] for r in rows]
    if len(set(steps)) < len(steps):
        twice = sorted({s for s in steps if steps.count(s) > 1})
        raise argparse.ArgumentTypeError(f"{text} has the row {', '.join(twice)} more than once")
    machine = run.get("machine")
    return {"path": text, "machine": machine if isinstance(machine, dict) else {}, "rows": rows}


def measured(value) -> bool:
    """A time or an MFU as make bench writes it: a positive, finite number (JSON's true is not one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def apart(x: float, y: float) -> float:
    """How far apart two times (or MFUs) are: the larger over the smaller, less 1."""
    return max(x, y) / min(x, y) - 1


def default_batch_size(steps: list[str], preset: str) -> int:
    """B on a GPU: the smallest of the timed steps' own batch sizes in the preset, so that every row fits where its
    step does (at step 17's B=64, T=1024, step 10's fp32 attention scores alone take 3.2 GB a layer)."""
    return min(importlib.import_module(f"steps.{step}.__main__").PRESETS[preset]["batch_size"] for step in steps)


def flops_per_token(n_layer: int, n_head: int, n_embd: int, seq_len: int) -> int:
    """6N + 12 L H Q T, N without the position embeddings (GPT-2 small: N = 123,653,376)."""
    n = VOCAB * n_embd + n_layer * (12 * n_embd**2 + 13 * n_embd) + 2 * n_embd  # wte (= lm_head), blocks, ln_f
    return 6 * n + 12 * n_layer * n_head * (n_embd // n_head) * seq_len


def peak_memory_mb(dev) -> float:
    """CUDA: the most memory tensors held at once. CPU: the process's peak resident memory (VmHWM; not getrusage's
    ru_maxrss, which in a process started from a larger one, as the workers are, is that one's peak)."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    status = Path("/proc/self/status")
    kb = re.search(r"VmHWM:\s+(\d+) kB", status.read_text()) if status.exists() else None
    return int(kb.group(1)) / 1024 if kb else math.nan


# ---- the workers: each runs in a process of its own and prints its row as its last line ----

def time_step(spec: dict) -> dict:
    """One step's row: its main() with the bench's flags, validation, checkpoints, export and sample stubbed out;
    the times are the per-iteration ms its own log writes to metrics.jsonl."""
    import torch

    from shared import checkpoint, runlog

    main = importlib.import_module(f"steps.{spec['kind']}.__main__")
    row = {"dtype": "fp32", "compile": "no", "compile_s": None}
    after = {}  # iteration -> the clock's tick after it
    if spec.get("clock"):
        tick, row["clock_dtype"] = matmul_clock()
        log, row["faults"], since = runlog.RunLog.log, [], [minor_faults()]

        def log_then_tick(self, it, *args, **kwargs):
            log(self, it, *args, **kwargs)
            if it >= spec["warmup"]:
                row["faults"].append(minor_faults() - since[0])
            if it == spec["warmup"] - 1 and spec.get("heap_pad_mb"):
                row["peak_mem_mb"] = peak_memory_mb(torch.device("cpu"))  # before the pad, which would count
                grow_heap(spec["heap_pad_mb"])
            if it >= spec["warmup"] - 1:
                after[it] = tick()
            since[0] = minor_faults()
            self.t0 = time.perf_counter()  # the tick is not in the next iteration's ms
        runlog.RunLog.log = log_then_tick
    main.evaluate = lambda *a, **k: math.nan
    main.show_sample = lambda *a, **k: None
    main.shapes.show = lambda *a, **k: None  # a forward pass of its own, 2 s of GPT-2 on a CPU
    main.GPT.save_pretrained = lambda *a, **k: None
    checkpoint.save = lambda *a, **k: None
    if hasattr(main, "choose_dtype"):
        choose = main.choose_dtype

        def choose_dtype(args):
            said = choose(args)
            row["dtype"] = args.dtype
            return said
        main.choose_dtype = choose_dtype
    if hasattr(main, "compiled"):
        compiled = main.compiled

        def timed_compile(model, args, *batch):
            start = time.perf_counter()
            fast, note = compiled(model, args, *batch)
            row["compile"] = "yes" if fast is not model else "no"
            row["compile_s"] = round(time.perf_counter() - start, 1) if fast is not model else None
            return fast, note
        main.compiled = timed_compile
    text = (ROOT / "steps" / spec["kind"] / "__main__.py").read_text()
    B, T = spec["batch_size"], spec["seq_len"]
    with tempfile.TemporaryDirectory() as out:
        flags = ["--preset", spec["preset"], "--batch-size", str(B), "--seq-len", str(T), "--device", spec["device"],
                 "--max-steps", str(spec["warmup"] + spec["iters"]), "--eval-every", "1000000",
                 "--save-every", "1000000", "--log-every", "1", "--seed", "0", "--out", str(Path(out) / "run")]
        if '"--total-batch-size"' in text:
            flags += ["--total-batch-size", str(B * T)]  # one micro-batch an iteration
        if '"--compile"' in text:
            flags += ["--compile" if spec["compile"] else "--no-compile"]
        main.main(flags)
        rows = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "loss" in r and r["iter"] >= spec["warmup"]]
    ms = [r["ms"] for r in timed]
    row.update(ms=ms, ms_per_iter=statistics.median(ms))
    if "peak_mem_mb" not in row:  # taken before the pad where there was one
        row["peak_mem_mb"] = peak_memory_mb(torch.device(spec["device_type"]))
    if after:
        row["clock_ms"] = beside(after, [r["iter"] for r in timed])
    return row


def time_reference(spec: dict) -> dict:
    """transformers.GPT2LMHeadModel (SDPA attention) trained as the last step trains: the same dtype, GPT-3's
    fused AdamW (decaying every parameter, where the steps leave biases and gains alone: the same arithmetic but for
    0.1% of the parameters), clipping at 1.0, compiled as the steps' rows are, on the same micro-batches."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    from shared import data, device

    dev = device.pick(spec["device"])
    bf16 = device.bf16_native(dev)[0]
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    p = spec["model"]
    config = GPT2Config(n_layer=p["n_layer"], n_head=p["n_head"], n_embd=p["n_embd"], n_positions=spec["seq_len"],
                        vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    model = GPT2LMHeadModel(config).to(dev)
    assert model.config._attn_implementation == "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=dev.type in ("cpu", "cuda"))
    B, T = spec["batch_size"], spec["seq_len"]
    tok = data.gpt2_tokenizer()
    ids = torch.tensor(tok.encode(data.shakespeare()[: 4 * B * T * 8]), device=dev)  # enough text for a few batches
    row = {"dtype": "bf16" if bf16 else "fp32", "compile": "no", "compile_s": None}
    fast = model
    if spec.get("compile", dev.type == "cuda"):  # as the steps' compiled(): one forward and backward compiles both
        start = time.perf_counter()
        try:
            fast = torch.compile(model)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                fast(input_ids=ids[: B * T].view(B, T)).logits.float().mean().backward()
            row["compile"], row["compile_s"] = "yes", round(time.perf_counter() - start, 1)
        except Exception as e:  # no C++ compiler, a device it does not support: the eager model, and why
            fast = model
            print(f"compile failed ({cli.one_line(e, 120)}); running eager", flush=True)
        model.zero_grad(set_to_none=True)
    ms, after = [], {}  # after: iteration -> the clock's tick after it
    if spec.get("clock"):
        tick, row["clock_dtype"] = matmul_clock()
        row["faults"] = []
    for it in range(spec["warmup"] + spec["iters"]):
        faults = minor_faults()
        start = time.perf_counter()
        pos = (it * B * T) % (len(ids) - B * T - 1)
        x, y = ids[pos : pos + B * T].view(B, T), ids[pos + 1 : pos + B * T + 1].view(B, T)  # (B, T) each
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            logits = fast(input_ids=x).logits  # (B, T, vocab)
        loss = F.cross_entropy(logits.float().view(-1, VOCAB), y.view(-1))
        del logits  # as the steps do: not kept into the next iteration's forward
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss.item()  # waits for the device
        elapsed = (time.perf_counter() - start) * 1000
        if it >= spec["warmup"]:
            ms.append(elapsed)
            if spec.get("clock"):
                row["faults"].append(minor_faults() - faults)
        print(f"iter {it:5d} | loss {loss.item():.4f} | {elapsed:8.2f} ms", flush=True)
        if it == spec["warmup"] - 1 and spec.get("heap_pad_mb"):
            row["peak_mem_mb"] = peak_memory_mb(dev)  # before the pad, which would count
            grow_heap(spec["heap_pad_mb"])
        if spec.get("clock") and it >= spec["warmup"] - 1:
            after[it] = tick()  # before the next iteration's start
    row.update(ms=ms, ms_per_iter=statistics.median(ms))
    if "peak_mem_mb" not in row:  # taken before the pad where there was one
        row["peak_mem_mb"] = peak_memory_mb(dev)
    if after:
        row["clock_ms"] = beside(after, list(range(spec["warmup"], spec["warmup"] + spec["iters"])))
    return row


def minor_faults() -> int:
    """The page faults this process has taken so far that needed no disk: a new page of memory is one."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def grow_heap(mb: int) -> None:
    """Touches mb MB of new heap and frees it. glibc keeps it (the workers' KEEP_FREED_MEMORY), so a timed iteration
    that grows the heap finds those pages faulted in already, as they would be after a long run."""
    import torch

    pad = torch.ones(mb * 2**20, dtype=torch.uint8)  # written: every page faulted in
    del pad


CLOCK_N = 2048  # the clock's matmul is CLOCK_N x CLOCK_N by CLOCK_N x CLOCK_N: 2 CLOCK_N^3 FLOPs


def matmul_clock():
    """tick() -> the ms of one large matmul on the CPU now (the median of 5), in bf16 where this CPU has it, fp32
    elsewhere (only a CPU's rows have a clock).
    A shared machine's speed drifts over tens of seconds; make bench prints how closely the training iterations
    drift with the matmul (the correlation)."""
    import torch

    from shared import device

    dtype = torch.bfloat16 if device.bf16_native(torch.device("cpu"))[0] else torch.float32
    a, b = torch.randn(CLOCK_N, CLOCK_N, dtype=dtype), torch.randn(CLOCK_N, CLOCK_N, dtype=dtype)
    a @ b  # the first call warms the thread pool

    def tick() -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
    return tick, str(dtype).removeprefix("torch.")


def together(runs: dict[str, list[dict]]) -> float | None:
    """The correlation of each timed iteration's ms (over the median of its row's, so that the rows line up) with
    the clock beside it: near 1 when the machine's drift slows the iterations and the matmul alike. runs: a row's
    label -> its runs, one a round. None: too few iterations, or ms or clocks that did not vary."""
    x, y = [], []
    for done in runs.values():
        median = statistics.median(m for row in done for m in row["ms"])
        x += [m / median for row in done for m in row["ms"]]
        y += [c for row in done for c in row["clock_ms"]]
    return statistics.correlation(x, y) if len(x) > 2 and len(set(x)) > 1 and len(set(y)) > 1 else None


def beside(after: dict[int, float], timed: list[int]) -> list[float]:
    """The clock beside each timed iteration: the mean of the ticks after the iteration before it and after it."""
    return [statistics.mean([after[j] for j in (i - 1, i) if j in after]) for i in timed]


def worker_spec(argv: list[str]) -> dict:
    """The spec run_worker gives a worker (JSON). --worker is not for use by hand: anything else gets one line."""
    try:
        spec = json.loads(argv[0]) if len(argv) == 1 else None
    except ValueError:
        spec = None
    if not isinstance(spec, dict) or "kind" not in spec:
        sys.exit("error: --worker is how make bench times one row in a process of its own, with a spec it writes: "
                 "run make bench instead (make bench ARGS=\"--help\" lists every flag)")
    return spec


def worker(spec: dict) -> None:
    kind = spec["kind"]
    row = time_reference(spec) if kind == REFERENCE else time_step(spec)
    print(RESULT + json.dumps(row), flush=True)


# ---- the parent: one worker process a row, the table, bench.json and the chart ----

def run_worker(spec: dict, label: str) -> dict:
    """Runs a worker, showing its iteration lines as they come; exits with its output when it fails."""
    cmd = [sys.executable, "-m", "shared.bench", "--worker", json.dumps(spec)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**(KEEP_FREED_MEMORY if spec.get("keep_freed_memory") else {}), **os.environ})
    lines, result = [], None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT):])
        elif line.startswith("iter") and "| loss" in line:
            print(f"  {label:<18} {line.rstrip()}", flush=True)
    if proc.wait() != 0 or result is None:
        killed = proc.returncode == -signal.SIGKILL  # what Linux's out-of-memory killer sends, without a word
        sys.exit(f"error: the {label} row failed (exit {proc.returncode}"
                 + ": killed, most likely by the kernel for want of memory; try a smaller --batch-size or --seq-len"
                 * killed + "). Its output ends:\n" + "".join(lines[-15:]))
    return result


def cuda_peak(name: str, given: float | None) -> tuple[float | None, str]:
    if given:
        return given, "--peak-tflops"
    for key, tflops in PEAK_TFLOPS.items():  # "NVL" and "H100 PCIe" before "H100"
        if key in name and tflops:
            return float(tflops), f"datasheet, {key}, dense bf16"
        if key in name:
            break
    return None, f"unknown GPU {name}: give --peak-tflops for an MFU"


def table(rows: list[dict], flops: int) -> str:
    w = max([22] + [len(r["step"]) for r in rows])  # "11_mixed_precision again" is 24
    head = (f"{'step':<{w}} {'ms/iter':>9} {'spread':>7} {'clock ms':>8} {'tokens/s':>9} {'vs 10':>6} {'MFU':>6} "
            f"{'peak MB':>8}  dtype {'compile':>8}  lesson")
    base = next((r["tok_per_s"] for r in rows if r["step"].startswith("10_")), None)
    lines = [head, "-" * len(head)]
    for r in rows:
        speedup = f"{r['tok_per_s'] / base:5.2f}x" if base else "     -"
        mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "     -"
        compiled = f"{r['compile_s']:6.0f} s" if r["compile_s"] is not None else "      no"
        clock = f"{r['clock_ms_median']:8.1f}" if r["clock_ms_median"] is not None else "       -"
        spread = f"{100 * r['spread']:6.1f}%" if r["spread"] is not None else "      -"
        lines.append(f"{r['step']:<{w}} {r['ms_per_iter']:9.1f} {spread} {clock:>8} "
                     f"{r['tok_per_s']:9,.0f} {speedup:>6} {mfu:>6} {r['peak_mem_mb']:8,.0f}  {r['dtype']:<5} "
                     f"{compiled:>8}  {r['lesson']}")
    return "\n".join(lines) + f"\nFLOPs per token = 6N + 12 L H Q T = {flops:,}"


def compare(a: dict, b: dict, within: float = 0.05) -> None:
    """Two runs side by side, row by row: each one's ms/iter and MFU, and how far apart they are."""
    for name, run in (("A", a), ("B", b)):
        m = run["machine"]
        about = [m["command"]] if isinstance(m.get("command"), str) else []
        if measured(m.get("minutes")):
            about.append(f"{m['minutes']} minutes")
        if isinstance(m.get("device"), str):
            about.append(f"on {m['device']}")
        if measured(m.get("median_clock_ms")):
            about.append(f"median clock {m['median_clock_ms']:.1f} ms")
        print(f"{name}: {run['path']}" + (f" ({', '.join(about)})" if about else ""))
    setup = ("device", "torch", "threads", "preset", "batch_size", "seq_len", "compile", "rounds", "warmup", "iters",
             "keep_freed_memory", "heap_pad_mb")
    differ = [f"{k} ({a['machine'][k]}, {b['machine'][k]})" for k in setup
              if k in a["machine"] and k in b["machine"] and a["machine"][k] != b["machine"][k]]
    if differ:
        print(f"the runs were not set up alike: {'; '.join(differ)}")
    theirs = {r["step"]: r for r in b["rows"]}
    pairs = [(r, theirs[r["step"]]) for r in a["rows"] if r["step"] in theirs]
    if not pairs:
        sys.exit(f"error: {a['path']} and {b['path']} have no row in common: compare runs of the same steps")
    w = max([22] + [len(r["step"]) for r, _ in pairs])
    head = f"{'step':<{w}} {'ms/iter A':>10} {'ms/iter B':>10} {'apart':>8} {'MFU A':>7} {'MFU B':>7} {'apart':>8}"
    print(head + "\n" + "-" * len(head))
    far, far_mfu = [], []  # (how far apart in %, to the 0.1 shown; the row)
    for r, s in pairs:
        far.append((round(100 * apart(r["ms_per_iter"], s["ms_per_iter"]), 1), r["step"]))
        line = f"{r['step']:<{w}} {r['ms_per_iter']:10.1f} {s['ms_per_iter']:10.1f} {far[-1][0]:7.1f}%"
        if r.get("mfu") is not None and s.get("mfu") is not None:
            far_mfu.append((round(100 * apart(r["mfu"], s["mfu"]), 1), r["step"]))
            line += f" {100 * r['mfu']:6.1f}% {100 * s['mfu']:6.1f}% {far_mfu[-1][0]:7.1f}%"
        else:
            line += f" {'-':>7} {'-':>7} {'-':>8}"
        print(line)
    mine = {r["step"] for r in a["rows"]}
    only = [r["step"] for r in a["rows"] if r["step"] not in theirs]
    only += [s["step"] for s in b["rows"] if s["step"] not in mine]
    if only:
        print(f"in one run only, not compared: {', '.join(only)}")
    print("apart: the larger over the smaller, less 1 (in ms/iter, the slower over the faster)")
    for what, found in (("ms/iter", far), ("MFU", far_mfu)):
        if found:
            d, step = max(found)
            print(f"{what}: {sum(x <= 100 * within for x, _ in found)} of {len(found)} rows within "
                  f"{100 * within:.0f}% (the farthest apart: {step}, {d:.1f}%)")


def bar_chart(rows: list[dict], title: str) -> str:
    """An SVG of tokens/s, one bar a row, with the MFU beside it."""
    width, left, bar, gap = 760, 150, 22, 8
    top = 40
    height = top + len(rows) * (bar + gap) + 20
    most = max(r["tok_per_s"] for r in rows)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="13">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="22" font-size="15">{title}</text>']
    for i, r in enumerate(rows):
        y = top + i * (bar + gap)
        w = (width - left - 190) * r["tok_per_s"] / most
        colour = "#999" if r["step"] == REFERENCE else "#3a6ea5"
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
        out += [f'<text x="{left - 8}" y="{y + 16}" text-anchor="end">{r["step"]}</text>',
                f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar}" fill="{colour}"/>',
                f'<text x="{left + w + 6:.1f}" y="{y + 16}">{r["tok_per_s"]:,.0f} tokens/s{mfu}</text>']
    return "\n".join(out + ["</svg>"]) + "\n"


def main(argv=None):
    p = cli.ArgumentParser(prog="make bench", description=__doc__.split("\n\n")[0],
                           epilog='Flags go through ARGS: make bench ARGS="--steps 10,15 --iters 3"',
                           hint='make bench ARGS="--help"')
    p.add_argument("--steps", type=step_list, default=None, help="the steps to time, e.g. 10,15, or all (default: "
                   f"10-{LADDER_LAST}; 17 and 18 train as {LADDER_LAST} does on one process)")
    p.add_argument("--preset", default="gpt2", choices=["tiny", "gpt2"], help="the model's sizes (tiny: 4 layers of "
                   "128; gpt2: GPT-2 124M; default: gpt2)")
    p.add_argument("--batch-size", type=cli.positive_int, help="B; default: 1 on a CPU; on a GPU the smallest "
                   "of the timed steps' own (gpt2: 16 with any of steps 10-16, 64 for steps 17 and 18 alone)")
    p.add_argument("--seq-len", type=cli.positive_int, help="T; default: the preset's (1024 for gpt2)")
    p.add_argument("--rounds", type=cli.positive_int, help="rounds of every row, in a rotated order, the last timed "
                   "step's row again at the end of each as a control (default: 2 on a CPU, 3 on a GPU)")
    p.add_argument("--iters", type=cli.positive_int, help="timed iterations a row a round (default: 3 on a CPU, "
                   "10 on a GPU)")
    p.add_argument("--warmup", type=cli.non_negative_int, help="iterations a row a round before the timed ones "
                   "(default: 3 on a CPU, 5 on a GPU)")
    p.add_argument("--no-compile", action="store_true", help="the eager ladder: compile no row (by default the rows "
                   "whose step compiles, 12 on, and hf_gpt2 are compiled on every device)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="where to run; auto (the "
                   "default) = cuda, else mps, else cpu. mps takes a CPU's defaults and has no clock: give "
                   "--peak-tflops for an MFU")
    p.add_argument("--json", type=cli.out_file, help="where the rows go (default: runs/bench.json, with --generate "
                   "runs/bench-generate.json); the chart goes beside it, as .svg")
    p.add_argument("--no-reference", action="store_true", help="leave out the transformers GPT-2 row")
    p.add_argument("--returned-memory", action="store_true", help="leave glibc's default: freed buffers over 32 MB "
                   "go back to the kernel and fault in again, as under make step (by default the workers keep them)")
    p.add_argument("--heap-pad-mb", type=heap_pad, help="on a CPU, the MB of new heap each worker "
                   f"touches after its warm-up and frees, for the timed iterations to grow into without page faults "
                   f"(default: {HEAP_PAD_MB:,}; 0: none, to see the faults)")
    p.add_argument("--peak-tflops", type=cli.positive_float, help="the peak TFLOP/s for the MFU column: for a GPU "
                   "this does not know (A100, H100 and H200 it does); on a CPU it replaces the measured peak")
    p.add_argument("--generate", action="store_true", help="time generation instead: greedy decoding, batch 1, with "
                   "and without the KV cache of the last step that has one, beside transformers' generate")
    p.add_argument("--prompt-tokens", type=cli.positive_int, help="with --generate: the prompt's length (default: "
                   "32)")
    p.add_argument("--new-tokens", type=cli.positive_int, help="with --generate: tokens to write (default: 256, or "
                   "fewer where the context leaves fewer after the prompt)")
    p.add_argument("--compare", nargs=2, type=bench_json, metavar=("A.json", "B.json"), help="time nothing: show two "
                   "runs' rows side by side (their --json files) and how far apart each row is; the flags that "
                   "choose what to time have no say")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.heap_pad_mb and args.returned_memory:
        p.error("--heap-pad-mb with --returned-memory: glibc would hand the pad straight back (drop one of them)")
    if args.heap_pad_mb and args.warmup == 0:
        p.error("--heap-pad-mb with --warmup 0: the pad is grown after the warm-up, and there is none (drop one of "
                "them)")
    if args.compare and args.generate:
        p.error("--compare with --generate: --compare times nothing (drop one of them)")
    ladder_only = [f"--{k.replace('_', '-')}" for k in LADDER_ONLY
                   if getattr(args, k) is not None and getattr(args, k) is not False]  # given: --heap-pad-mb 0 too
    if args.generate and ladder_only:
        one = len(ladder_only) == 1
        p.error(f"--generate with {', '.join(ladder_only)}: {'a flag' if one else 'flags'} of the training ladder, "
                f"which --generate does not time (drop {'it' if one else 'them'})")
    if not args.generate and (args.prompt_tokens or args.new_tokens):
        p.error("--prompt-tokens and --new-tokens go with --generate")
    if args.compare:
        return compare(*args.compare)
    try:
        args.json = args.json or cli.out_file("runs/bench-generate.json" if args.generate else "runs/bench.json")
    except argparse.ArgumentTypeError as e:
        p.error(f"argument --json: {e}")
    if args.generate:
        return generation(args)
    if args.json.suffix == ".svg":
        p.error(f"argument --json: {args.json} would be overwritten by the chart, which goes beside it as .svg: give "
                "a name that ends in .json")

    import torch

    from shared import device
    from shared.steps import lesson

    began = time.perf_counter()
    dev = device.pick(args.device)
    gpu = dev.type == "cuda"
    preset = importlib.import_module(f"steps.{trainer_steps()[-1]}.__main__").PRESETS[args.preset]  # the steps' own
    model = {k: preset[k] for k in ("n_layer", "n_head", "n_embd")}
    steps = args.steps or default_steps()
    B = args.batch_size or (default_batch_size(steps, args.preset) if gpu else 1)
    T = args.seq_len or preset["seq_len"]
    # 3 warm-up iterations on a CPU: each of the first iterations touches memory the process never had, and every
    # new page costs a fault (on a VM with free page reporting, one in the host as well); a step that does not
    # compile runs its first forward and backward in iteration 0, a compiled one while compiling (docs/bench.md)
    # on a CPU, 2 rounds of 3: a process costs 30-65 s on slow 2 cores (its start, the compile, the warm-up), and 2
    # rounds of the 9 rows took 10-14 minutes there in ten runs (docs/bench.md)
    iters, warmup = args.iters or (10 if gpu else 3), args.warmup if args.warmup is not None else (5 if gpu else 3)
    rounds = args.rounds or (3 if gpu else 2)
    common = dict(device=args.device, device_type=dev.type, preset=args.preset, model=model, batch_size=B,
                  seq_len=T, iters=iters, warmup=warmup, compile=not args.no_compile,
                  keep_freed_memory=not args.returned_memory, clock=dev.type == "cpu",
                  heap_pad_mb=0 if dev.type != "cpu" or args.returned_memory or warmup == 0 else
                  HEAP_PAD_MB if args.heap_pad_mb is None else args.heap_pad_mb)
    flops = flops_per_token(**model, seq_len=T)
    name = device_name(dev)
    print(f"make bench on {name} ({dev.type}, torch {torch.__version__}, {torch.get_num_threads()} threads): "
          f"{args.preset} preset, B={B}, T={T}; {rounds} round{'s' * (rounds > 1)} of every row, {warmup} warm-up + "
          f"{iters} timed iterations a row a round; "
          f"{'eager' if args.no_compile else 'compiled where the step compiles'}; freed memory "
          f"{'returned to the kernel (glibc default)' if args.returned_memory else 'kept for reuse (glibc)'}"
          + (f", {common['heap_pad_mb']:,} MB of heap grown after the warm-up" if common["heap_pad_mb"] else ""))
    print(f"FLOPs per token = 6N + 12 L H Q T = {flops:,} (N without the position embeddings)")
    if gpu:
        peak, source = cuda_peak(name, args.peak_tflops)
    else:  # on a CPU the median clock of the run, unless given
        peak = args.peak_tflops
        source = "--peak-tflops" if peak else f"no clock on {dev.type}: give --peak-tflops for an MFU"
    if peak:
        print(f"peak: {peak:.3f} TFLOP/s ({source})")

    labels = steps + ([] if args.no_reference else [REFERENCE])
    control = f"{steps[-1]} again"  # the last step's row once more: a process of its own, as every run of a row
    runs = {label: [] for label in [*labels, control]}  # each run's row, round after round
    for r in range(rounds):
        order = labels[r % len(labels):] + labels[: r % len(labels)] + [control]  # rotated; the control last
        print(f"round {r + 1} of {rounds}: {', '.join(order)}", flush=True)
        for label in order:
            kind = steps[-1] if label == control else label
            row = run_worker({**common, "kind": kind}, label)
            runs[label].append(row)
            clock = f", the clock {statistics.median(row['clock_ms']):.1f} ms" if "clock_ms" in row else ""
            n = sum(row.get("faults", []))
            faults = f", {n:,} page fault{'s' * (n != 1)}" if "faults" in row else ""
            print(f"  {label:<18} {statistics.median(row['ms']):,.1f} ms/iter{clock}{faults}", flush=True)

    done_rows = [row for done in runs.values() for row in done]
    every = sorted(c for row in done_rows for c in row.get("clock_ms", []))  # the clocks of the whole run
    typical = statistics.median(every) if every else None
    if typical and not peak:  # the matmul's speed at the run's typical moment, as ms/iter is the iterations'
        peak = 2 * CLOCK_N**3 / (typical / 1000) / 1e12
        source = (f"measured: a {CLOCK_N} x {CLOCK_N} matmul in {done_rows[0]['clock_dtype']}, "
                  f"{torch.get_num_threads()} threads, the median of the {len(every)} clocks beside the timed "
                  "iterations (each the mean of the ticks before and after one, a tick the median of 5)")
    rows = []
    for label, done in runs.items():
        kind = steps[-1] if label == control else label
        ms = [m for row in done for m in row["ms"]]
        medians = [statistics.median(row["ms"]) for row in done]
        clock = [c for row in done for c in row.get("clock_ms", [])]
        ms_per_iter = statistics.median(ms)
        tok_per_s = B * T / (ms_per_iter / 1000)
        compile_s = [row["compile_s"] for row in done if row["compile_s"] is not None]
        rows.append({"step": label, "lesson": "transformers.GPT2LMHeadModel, SDPA" if kind == REFERENCE
                     else "the same row again: the machine's noise" if label == control
                     else re.split(r"[:(,]", lesson(kind))[0].strip(),
                     "ms_per_iter": round(ms_per_iter, 2),
                     "clock_ms_median": round(statistics.median(clock), 2) if clock else None,
                     "spread": round((max(medians) - min(medians)) / ms_per_iter, 4) if rounds > 1 else None,
                     "round_ms": [round(m, 2) for m in medians], "tok_per_s": round(tok_per_s, 1),
                     "mfu": round(flops * tok_per_s / (peak * 1e12), 4) if peak else None,
                     "peak_mem_mb": round(max(row["peak_mem_mb"] for row in done), 1), "dtype": done[0]["dtype"],
                     "compile": done[0]["compile"], "compile_s": round(statistics.median(compile_s), 1)
                     if compile_s else None,
                     "ms": [round(m, 2) for m in ms], "clock_ms": [round(c, 3) for c in clock],
                     "faults": [f for row in done for f in row.get("faults", [])]})

    print(f"\npeak: {f'{peak:.3f} TFLOP/s' if peak else 'unknown'} ({source})")
    print(table(rows, flops))
    first, again = next(r for r in rows if r["step"] == steps[-1]), rows[-1]
    print(f"noise: the control row ({control}) differs from {steps[-1]} by "
          f"{100 * abs(again['ms_per_iter'] - first['ms_per_iter']) / first['ms_per_iter']:.1f}%; "
          + (f"a row's spread is the range of its {rounds} rounds' medians. " if rounds > 1 else
             "a spread needs 2 rounds or more. ") + "Compile times are not in ms/iter.")
    correlation = together(runs) if every else None
    if every:
        print(f"the clock ({CLOCK_N} x {CLOCK_N} matmul, {done_rows[0]['clock_dtype']}) beside the {len(every)} timed "
              f"iterations: fastest {every[0]:.1f} ms, median {typical:.1f} ms, slowest {every[-1]:.1f} ms (a row's "
              "median in the clock column). The clock and the iterations' ms (each over its row's median): "
              + (f"correlation {correlation:.2f}" if correlation is not None else "no correlation (too few timed "
                 "iterations, or ms or a clock that did not move)")
              + (" (the clock moved by less than 5%: too little for the correlation to say much)."
                 if correlation is not None and every[-1] < 1.05 * every[0] else "."))
    faults = [(f, row["step"]) for row in rows for f in row["faults"]]
    if faults:
        most, where = max(faults)
        if common["heap_pad_mb"]:
            why = (f"each worker touched {common['heap_pad_mb']:,} MB of new heap after its warm-up and freed it, for "
                   "the iterations to grow into")
        elif args.returned_memory:
            why = "--returned-memory: glibc hands freed buffers back, so every iteration faults"
        elif warmup == 0:
            why = "no warm-up, so no heap grown after it"
        else:
            why = "no heap grown after the warm-up (--heap-pad-mb 0)"
        print(f"page faults in the {len(faults)} timed iterations: {sum(f for f, _ in faults):,}, at most {most:,} in "
              f"one ({where}); {why}")
    machine = {"device": name, "device_type": dev.type, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "peak_tflops": peak, "peak_source": source, "preset": args.preset, **model, "batch_size": B,
               "seq_len": T, "rounds": rounds, "warmup": warmup, "iters": iters, "compile": not args.no_compile,
               "keep_freed_memory": not args.returned_memory, "heap_pad_mb": common["heap_pad_mb"],
               "median_clock_ms": typical,
               "clock_correlation": round(correlation, 3) if correlation is not None else None,
               "flops_per_token": flops, "minutes": round((time.perf_counter() - began) / 60, 1),
               "command": "make bench" + (f' ARGS="{" ".join(sys.argv[1:])}"' if argv is None and sys.argv[1:] else "")}
    args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")
    chart = args.json.with_suffix(".svg")
    chart.write_text(bar_chart(rows, f"{args.preset}, B={B}, T={T} on {name}"))
    print(f"rows: {args.json}   chart: {chart}")


def generation(args) -> None:
    """Tokens/s of greedy decoding on the same random weights: the last step with its KV cache, without it (a whole
    forward a token), and transformers.GPT2LMHeadModel.generate (which keeps a cache too). One warm-up call each."""
    import torch
    import transformers
    from transformers import GPT2LMHeadModel

    from shared import device

    dev = device.pick(args.device)
    step = next((s for s in reversed(trainer_steps()) if "use_cache" in (ROOT / "steps" / s / "model.py").read_text()),
                None)
    if step is None:
        sys.exit("error: no step has a KV cache yet (generate(..., use_cache=...)): step 18 brings it")
    model_py = importlib.import_module(f"steps.{step}.model")
    preset = importlib.import_module(f"steps.{step}.__main__").PRESETS[args.preset]
    torch.manual_seed(0)
    config = model_py.GPTConfig(block_size=args.seq_len or preset["seq_len"], n_layer=preset["n_layer"],
                                n_head=preset["n_head"], n_embd=preset["n_embd"], dropout=0.0)
    args.prompt_tokens = args.prompt_tokens or 32
    n = args.new_tokens or max(1, min(256, config.block_size - args.prompt_tokens))  # the default fits the context
    if args.prompt_tokens + n > config.block_size:  # past it our steps slide a window; transformers' GPT-2 stops
        what = (f"--prompt-tokens {args.prompt_tokens} + --new-tokens {n} is more than" if args.new_tokens
                else f"--prompt-tokens {args.prompt_tokens} leaves no token to write in")
        sys.exit(f"error: {what} the context of {config.block_size} positions: give fewer, or a longer --seq-len")
    ours = model_py.GPT(config).eval().to(dev)
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar above the table
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(Path(tmp))
        theirs = GPT2LMHeadModel.from_pretrained(tmp).eval().to(dev)
    prompt = torch.randint(50257, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(dev)
    name = device_name(dev)
    print(f"make bench --generate on {name} ({dev.type}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads): step {step}, {args.preset} sizes, context {config.block_size}, fp32, batch 1, a "
          f"{args.prompt_tokens}-token prompt, {n} new tokens, greedy")
    runs = {"KV cache": lambda k: ours.generate(prompt, k, top_k=1),
            "no cache": lambda k: ours.generate(prompt, k, top_k=1, use_cache=False),
            "transformers": lambda k: theirs.generate(prompt, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                                                      pad_token_id=50256)}
    if args.no_reference:
        del runs["transformers"]
    rows, out = [], {}
    with torch.no_grad():
        for label, run in runs.items():
            run(4)  # warm-up: the first calls allocate
            synchronize(dev)  # the warm-up's kernels done before the clock starts
            start = time.perf_counter()
            out[label] = run(n)
            synchronize(dev)
            seconds = time.perf_counter() - start
            rows.append({"row": label, "seconds": round(seconds, 3), "tok_per_s": round(n / seconds, 1)})
            print(f"  {label:<14} {seconds:8.2f} s  {n / seconds:9.1f} tokens/s", flush=True)
    same = all(torch.equal(out["KV cache"], o) for o in out.values())
    base = {r["row"]: r["tok_per_s"] for r in rows}
    print(f"the cache: {base['KV cache'] / base['no cache']:.2f}x without it"
          + (f", {base['KV cache'] / base['transformers']:.2f}x transformers" if "transformers" in base else "")
          + f"; the rows wrote {'the same' if same else 'different'} tokens")
    args.json.write_text(json.dumps({"machine": {"device": name, "torch": torch.__version__, "step": step,
                                                 "preset": args.preset, "block_size": config.block_size,
                                                 "prompt_tokens": args.prompt_tokens, "new_tokens": n},
                                     "rows": rows, "same_tokens": same}, indent=1) + "\n")
    print(f"rows: {args.json}")


def synchronize(dev) -> None:
    """Waits until the device has done what it was given (a GPU runs behind the Python that feeds it)."""
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def device_name(dev) -> str:
    """The GPU's name, or the CPU's (mps: the Mac's CPU beside it)."""
    import torch

    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_name() if dev.type == "cpu" else f"{dev.type} ({cpu_name()})"


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    found = re.search(r"model name\s*:\s*(.+)", info.read_text()) if info.exists() else None
    return f"{found.group(1).strip() if found else 'a CPU'}, {os.cpu_count()} cores"


if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["--worker"]:
            worker(worker_spec(sys.argv[2:]))
        else:
            main()
    except KeyboardInterrupt:  # Ctrl-C: the rows not yet measured are not written; nothing half-written is kept
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT: how a shell reports a command stopped by Ctrl-C
