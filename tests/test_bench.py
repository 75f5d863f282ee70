"""make bench (shared/bench.py): what it computes and writes, and the flags it refuses. No timing is asserted here:
speeds are what `make bench` measures, on the machine it runs on."""
import argparse
import json
import mmap
import os
import re
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

from shared import bench, device
from shared.steps import ROOT, all_steps
from tests.conftest import ctrl_c_as_in_a_terminal


def test_flops_per_token_of_gpt2_small_is_6n_plus_attention():
    n = 124_439_808 - 1024 * 768  # GPT-2 small with tying, without the position embeddings
    assert bench.flops_per_token(n_layer=12, n_head=12, n_embd=768, seq_len=1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312)])
def test_the_peak_of_a_known_gpu_is_its_datasheet_dense_bf16(name, tflops):
    assert bench.cuda_peak(name, None)[0] == tflops


@pytest.mark.parametrize("steps, batch", [(None, 16), (["17_fineweb_hellaswag", "18_kv_cache"], 64),
                                          (["10_training", "17_fineweb_hellaswag"], 16)])
def test_a_gpus_batch_is_the_smallest_of_the_timed_steps_own(steps, batch):
    # at step 17's 64, step 10's fp32 attention scores alone would take 3.2 GB a layer
    assert bench.default_batch_size(steps or bench.default_steps(), "gpt2") == batch


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "NVIDIA H100 NVL"])  # NVL: not the SXM card's peak
def test_an_unknown_gpu_has_no_mfu_unless_its_peak_is_given(name):
    assert bench.cuda_peak(name, None)[0] is None
    assert bench.cuda_peak(name, 165.0) == (165.0, "--peak-tflops")


def test_the_steps_that_can_be_timed_are_every_step_from_10_on():
    assert bench.trainer_steps() == [s for s in all_steps() if int(s[:2]) >= 10]  # step 10 brings the training loop


def test_the_default_ladder_is_steps_10_to_16():
    # 17 and 18 train as 16 does on one process; leaving them out keeps the default run within 15 minutes
    assert bench.default_steps() == ["10_training", "11_mixed_precision", "12_compile_flash", "13_vocab_50304",
                                     "14_gpt3_hparams", "15_grad_accum", "16_ddp"]


def test_steps_all_is_every_step_from_10_on():
    assert bench.step_list("all") == [s for s in all_steps() if int(s[:2]) >= 10]


def test_a_step_given_twice_is_refused():
    with pytest.raises(argparse.ArgumentTypeError, match="'10,15,10' names step 10_training twice"):
        bench.step_list("10,15,10")


def test_all_among_numbers_is_refused_as_standing_alone():
    with pytest.raises(argparse.ArgumentTypeError, match="all stands alone"):
        bench.step_list("all,10")


def test_steps_are_given_by_number_in_the_order_given():
    assert bench.step_list("15,10") == ["15_grad_accum", "10_training"]


def make_bench(*args):
    return subprocess.run(["make", "-s", "bench", f"ARGS={' '.join(args)}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("steps, message", [("99", "unknown step '99'"),
                                            ("05", "step 05_decoder has no training loop to time")])
def test_a_step_that_cannot_be_timed_is_refused_with_the_steps_that_can(steps, message):
    r = make_bench("--steps", steps)
    assert r.returncode == 2 and message in r.stderr and "10_training" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_bad_flag_gets_its_error_line_and_where_the_help_is_not_the_usage_block():
    r = make_bench("--iters", "0")
    said = [line for line in r.stderr.splitlines() if "*** [Makefile" not in line]  # make's own last word
    assert r.returncode == 2 and said == [
        "make bench: error: argument --iters: expected a positive integer, got '0'",
        '(make bench ARGS="--help" lists every flag)']


@pytest.mark.parametrize("argv", [[], ["{"], ["[1]"], ['{"x": 1}'], ["{}", "extra"]])
def test_worker_by_hand_is_refused_in_one_line_pointing_at_make_bench(argv):
    with pytest.raises(SystemExit) as stop:
        bench.worker_spec(argv)
    assert str(stop.value.code).startswith("error: --worker is how make bench times one row")


def test_generate_past_the_context_is_refused_with_the_flags_to_change(tmp_path):
    with pytest.raises(SystemExit) as stop:  # 32 + 50 > the tiny context of 64
        bench.main(["--generate", "--preset", "tiny", "--new-tokens", "50", "--json", str(tmp_path / "g.json")])
    assert "more than the context of 64 positions" in str(stop.value.code) and "--seq-len" in str(stop.value.code)


def test_a_prompt_that_fills_the_context_is_refused_without_naming_a_length_never_given(tmp_path):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--generate", "--preset", "tiny", "--prompt-tokens", "64", "--json", str(tmp_path / "g.json")])
    assert stop.value.code == ("error: --prompt-tokens 64 leaves no token to write in the context of 64 positions: "
                               "give fewer, or a longer --seq-len")


def test_generate_by_default_writes_what_the_context_leaves_after_the_prompt(tmp_path):
    bench.main(["--generate", "--preset", "tiny", "--json", str(tmp_path / "g.json")])  # 256 would not fit in 64
    machine = json.loads((tmp_path / "g.json").read_text())["machine"]
    assert (machine["block_size"], machine["prompt_tokens"], machine["new_tokens"]) == (64, 32, 32)


def test_a_json_path_that_is_a_directory_is_refused(tmp_path):
    r = make_bench("--json", str(tmp_path))
    assert r.returncode == 2 and "is a directory" in r.stderr and "Traceback" not in r.stderr


def test_a_json_path_the_chart_would_overwrite_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--json", str(tmp_path / "ladder.svg")])
    assert stop.value.code == 2 and "would be overwritten by the chart" in capsys.readouterr().err


def test_a_heap_pad_beyond_half_the_machines_memory_is_refused():
    r = make_bench("--heap-pad-mb", "100000000")
    assert r.returncode == 2 and "half this machine's memory" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("flags", [["--steps", "10"], ["--rounds", "2"], ["--no-compile"], ["--heap-pad-mb", "0"]])
def test_generate_with_a_flag_of_the_training_ladder_is_refused(flags, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--generate", *flags])
    assert stop.value.code == 2 and f"--generate with {flags[0]}: a flag of the training ladder" in \
        capsys.readouterr().err


def test_generation_lengths_without_generate_are_refused(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--new-tokens", "10"])
    assert stop.value.code == 2 and "--prompt-tokens and --new-tokens go with --generate" in capsys.readouterr().err


def test_generate_writes_its_rows_beside_the_ladders_not_over_them(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    written = []
    monkeypatch.setattr(bench, "generation", lambda args: written.append(args.json))
    bench.main(["--generate"])
    bench.main(["--generate", "--json", "runs/bench.json"])  # asked for by name: taken as given
    assert written == [bench.Path("runs/bench-generate.json"), bench.Path("runs/bench.json")]


def ladder(path, *rows, **machine) -> str:
    """A bench.json as make bench writes it, with rows of (step, ms/iter, MFU)."""
    path.write_text(json.dumps({"machine": machine, "rows": [{"step": step, "ms_per_iter": ms, "mfu": mfu}
                                                             for step, ms, mfu in rows]}))
    return str(path)


def test_how_far_apart_two_times_are_is_the_slower_over_the_faster():
    assert bench.apart(100.0, 104.0) == bench.apart(104.0, 100.0) == pytest.approx(0.04)


def two_runs(tmp_path) -> tuple[str, str]:
    """Two runs of steps 10 and 15, B's rows in the other order: 10 is 4.0% apart, 15 10.0% (MFU 3.4% and 9.1%)."""
    a = ladder(tmp_path / "a.json", ("10_training", 100.0, 0.30), ("15_grad_accum", 50.0, 0.60))
    b = ladder(tmp_path / "b.json", ("15_grad_accum", 55.0, 0.55), ("10_training", 104.0, 0.29))
    return a, b


def test_compare_shows_each_rows_two_times_and_mfus_and_how_far_apart(tmp_path, capsys):
    bench.main(["--compare", *two_runs(tmp_path)])
    printed = capsys.readouterr().out
    assert re.search(r"10_training +100\.0 +104\.0 +4\.0% +30\.0% +29\.0% +3\.4%", printed)
    assert re.search(r"15_grad_accum +50\.0 +55\.0 +10\.0% +60\.0% +55\.0% +9\.1%", printed)


def test_compare_counts_the_rows_within_5_percent_and_names_the_farthest(tmp_path, capsys):
    bench.main(["--compare", *two_runs(tmp_path)])
    printed = capsys.readouterr().out
    assert "ms/iter: 1 of 2 rows within 5% (the farthest apart: 15_grad_accum, 10.0%)" in printed
    assert "MFU: 1 of 2 rows within 5% (the farthest apart: 15_grad_accum, 9.1%)" in printed


def test_compare_heads_each_run_with_its_command_minutes_device_and_clock(tmp_path, capsys):
    a = ladder(tmp_path / "a.json", ("10_training", 100.0, 0.3), command="make bench", minutes=12.0,
               device="AMD EPYC, 2 cores", median_clock_ms=43.36)
    b = ladder(tmp_path / "b.json", ("10_training", 100.0, 0.3))  # a file without its machine: nothing made up
    bench.main(["--compare", a, b])
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == [f"A: {a} (make bench, 12.0 minutes, on AMD EPYC, 2 cores, median clock 43.4 ms)",
                           f"B: {b}"]


def test_compare_says_which_settings_of_the_two_runs_differ(tmp_path, capsys):
    a = ladder(tmp_path / "a.json", ("10_training", 100.0, 0.3), preset="gpt2", seq_len=1024, iters=3)
    b = ladder(tmp_path / "b.json", ("10_training", 100.0, 0.3), preset="tiny", seq_len=64, iters=3)
    bench.main(["--compare", a, b])
    assert "the runs were not set up alike: preset (gpt2, tiny); seq_len (1024, 64)\n" in capsys.readouterr().out


def test_compare_counts_the_memory_settings_threads_and_torch_as_setup(tmp_path, capsys):
    a = ladder(tmp_path / "a.json", ("10_training", 100.0, 0.3), torch="2.13.0", threads=2, keep_freed_memory=True,
               heap_pad_mb=2048)
    b = ladder(tmp_path / "b.json", ("10_training", 100.0, 0.3), torch="2.12.0", threads=4, keep_freed_memory=False,
               heap_pad_mb=0)
    bench.main(["--compare", a, b])
    assert ("the runs were not set up alike: torch (2.13.0, 2.12.0); threads (2, 4); keep_freed_memory (True, False); "
            "heap_pad_mb (2048, 0)\n") in capsys.readouterr().out


def test_compare_names_the_rows_of_either_run_alone_and_leaves_them_out(tmp_path, capsys):
    a = ladder(tmp_path / "a.json", ("10_training", 100.0, 0.3), ("17_fineweb_hellaswag", 50.0, 0.6))
    b = ladder(tmp_path / "b.json", ("10_training", 100.0, 0.3), ("18_kv_cache", 50.0, 0.6))
    bench.main(["--compare", a, b])
    printed = capsys.readouterr().out
    assert "in one run only, not compared: 17_fineweb_hellaswag, 18_kv_cache" in printed
    assert "ms/iter: 1 of 1 rows within 5%" in printed


def test_compare_leaves_a_row_without_an_mfu_in_either_run_out_of_the_mfu_count(tmp_path, capsys):
    # an unknown GPU's rows have no MFU (null) unless --peak-tflops is given
    a = ladder(tmp_path / "a.json", ("10_training", 100.0, 0.3), ("15_grad_accum", 50.0, 0.6))
    b = ladder(tmp_path / "b.json", ("10_training", 100.0, 0.3), ("15_grad_accum", 50.0, None))
    bench.main(["--compare", a, b])
    printed = capsys.readouterr().out
    assert re.search(r"15_grad_accum +50\.0 +50\.0 +0\.0% +- +- +-\n", printed)
    assert "MFU: 1 of 1 rows within 5%" in printed


@pytest.mark.parametrize("text, message", [
    (None, "no such file"), ("{not json", "cannot be read as JSON"), ("[1, 2]", "is not a ladder"),
    ('{"rows": []}', "is not a ladder"), ('{"rows": {"step": "10_training"}}', "is not a ladder"),
    ('{"rows": [{"step": "10_training", "ms_per_iter": "fast", "mfu": 0.3}]}', "is not a ladder"),
    ('{"rows": [{"step": "10_training", "ms_per_iter": 0, "mfu": 0.3}]}', "is not a ladder"),
    ('{"rows": [{"step": "10_training", "ms_per_iter": true, "mfu": 0.3}]}', "is not a ladder"),
    ('{"rows": [{"step": "10_training", "ms_per_iter": NaN, "mfu": 0.3}]}', "is not a ladder"),
    ('{"rows": [{"step": "10_training", "ms_per_iter": 100, "mfu": -0.3}]}', "is not a ladder"),
    ('{"rows": [{"step": "10_training", "ms_per_iter": 100}, {"step": "10_training", "ms_per_iter": 90}]}',
     "has the row 10_training more than once")])
def test_compare_refuses_a_bad_file_with_one_error_line_naming_it(tmp_path, capsys, text, message):
    bad = tmp_path / "bad.json"
    if text is not None:
        bad.write_text(text)
    good = ladder(tmp_path / "good.json", ("10_training", 100.0, 0.3))
    with pytest.raises(SystemExit) as stop:
        bench.main(["--compare", good, str(bad)])
    said = capsys.readouterr().err.splitlines()  # the error line, then where the help is
    assert stop.value.code == 2 and message in said[0] and str(bad) in said[0] and len(said) == 2


def test_compare_refuses_two_runs_with_no_row_in_common(tmp_path):
    a = ladder(tmp_path / "a.json", ("10_training", 100.0, 0.3))
    b = ladder(tmp_path / "b.json", ("15_grad_accum", 50.0, 0.6))
    with pytest.raises(SystemExit, match="no row in common"):
        bench.main(["--compare", a, b])


def test_compare_with_generate_is_refused(tmp_path, capsys):
    a = ladder(tmp_path / "a.json", ("10_training", 100.0, 0.3))
    with pytest.raises(SystemExit) as stop:
        bench.main(["--compare", a, a, "--generate"])
    assert stop.value.code == 2 and "--compare times nothing" in capsys.readouterr().err


def test_a_small_bench_writes_the_table_the_json_and_the_chart(tmp_path, capsys):
    bench.main(["--preset", "tiny", "--seq-len", "16", "--steps", "15", "--iters", "1", "--warmup", "0", "--rounds",
                "1", "--no-compile", "--peak-tflops", "1", "--device", "cpu", "--no-reference", "--json",
                str(tmp_path / "b.json")])
    printed = capsys.readouterr().out
    assert "15_grad_accum" in printed and "6N + 12 L H Q T" in printed and "ms/iter  spread clock ms" in printed
    result = json.loads((tmp_path / "b.json").read_text())
    row, control = result["rows"]
    assert row["step"] == "15_grad_accum" and row["tok_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_mem_mb"] > 0
    assert control["step"] == "15_grad_accum again"
    assert result["machine"]["flops_per_token"] == bench.flops_per_token(4, 4, 128, 16)
    assert (tmp_path / "b.svg").read_text().startswith("<svg")


def test_ctrl_c_stops_make_bench_and_its_worker_in_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "shared.bench", "--preset", "tiny", "--seq-len", "16", "--steps", "15",
                             "--iters", "100000", "--warmup", "0", "--rounds", "1", "--no-compile", "--device", "cpu",
                             "--no-reference", "--json", str(tmp_path / "b.json")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    for line in proc.stdout:  # until the worker is timing iterations
        if " iter " in line:
            break
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal sends Ctrl-C: to make bench and its worker
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "interrupted\n", err[-2000:]  # 128 + SIGINT, no traceback
    assert not (tmp_path / "b.json").exists()  # no ladder of rows never measured


# A worker whose clock reads 1.0 ms and, at each tick, moves the time.perf_counter that times the iterations 1000 s
# on: a tick inside an iteration would add 1,000,000 ms to its ms, which no load comes near (a sleeping tick of 1 s
# could not be told from an iteration slowed to 1467 ms beside two busy cores). Its page-fault counter goes up by 5
# at each reading.
FAKE_CLOCK_WORKER = """
import itertools, json, sys, time
from shared import bench
real, skipped = time.perf_counter, [0.0]
time.perf_counter = lambda: real() + skipped[0]


def tick():
    skipped[0] += 1000
    return 1.0


bench.matmul_clock = lambda: (tick, "float32")
bench.minor_faults = itertools.count(0, 5).__next__
bench.worker(json.loads(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def steps_worker():
    """One run of a step's worker process on the CPU (tiny sizes), with a fake clock: its output and its row."""
    spec = dict(kind="15_grad_accum", device="cpu", device_type="cpu", preset="tiny",
                batch_size=1, seq_len=16, warmup=1, iters=2, compile=False, clock=True, heap_pad_mb=1024)
    r = subprocess.run([sys.executable, "-c", FAKE_CLOCK_WORKER, json.dumps(spec)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, **bench.KEEP_FREED_MEMORY})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout, json.loads(r.stdout.splitlines()[-1].removeprefix(bench.RESULT))


def test_a_steps_worker_times_its_iterations_without_the_shapes_printout(steps_worker):
    out, row = steps_worker
    assert "shapes through one forward pass" not in out  # a forward pass of its own, not an iteration
    assert len(row["ms"]) == 2  # the warm-up iteration is not among the timed ones


def test_a_steps_worker_on_a_cpu_has_a_clock_beside_each_timed_iteration(steps_worker):
    _, row = steps_worker
    assert len(row["ms"]) == 2 and row["clock_ms"] == [1.0, 1.0]


def test_a_steps_worker_leaves_its_clocks_ticks_out_of_its_iterations_ms(steps_worker):
    _, row = steps_worker
    assert max(row["ms"]) < 100_000  # a tick skips 1,000,000 ms (FAKE_CLOCK_WORKER): none is in an iteration's ms


def test_a_steps_worker_on_a_cpu_counts_the_page_faults_of_each_timed_iteration(steps_worker):
    _, row = steps_worker
    assert row["faults"] == [5, 5]  # each: the reading after the iteration less the one just before it


def test_the_fault_counter_counts_the_pages_new_memory_takes():
    new = mmap.mmap(-1, 64 << 20)  # 64 MB the process never had (an anonymous mapping, not the heap's free space)
    before = bench.minor_faults()
    for offset in range(0, len(new), 4096):
        new[offset] = 1  # a write to each 4 KB page: a fault each (16,384 here)
    assert bench.minor_faults() - before >= 32  # at the least one a 2 MB page, where the kernel maps huge pages


def test_a_steps_worker_takes_its_peak_memory_before_the_heaps_pad(steps_worker):
    _, row = steps_worker
    assert row["peak_mem_mb"] < 1024  # after the pad of 1024 MB, the process's peak resident memory is above it


HEAP = """
import sys, torch
from shared.bench import grow_heap, minor_faults
before = minor_faults()
x = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MB of new heap, written
first = minor_faults() - before
del x
grow_heap(256)
before = minor_faults()
y = torch.ones(128 * 2**20, dtype=torch.uint8)
print(first, minor_faults() - before)
"""


def faults_before_and_after_the_pad(env: dict) -> tuple[int, int]:
    r = subprocess.run([sys.executable, "-c", HEAP], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    first, second = map(int, r.stdout.split())
    return first, second


def test_memory_the_heap_was_padded_with_is_written_again_without_page_faults():
    first, second = faults_before_and_after_the_pad({**os.environ, **bench.KEEP_FREED_MEMORY})
    assert first > 8192 and second < 1000  # 64 MB is 16,384 pages of 4 kB; 128 MB from the pad: (nearly) none


def test_without_freed_memory_kept_a_pad_goes_back_and_saves_no_page_fault():
    env = {k: v for k, v in os.environ.items() if k not in bench.KEEP_FREED_MEMORY}
    first, second = faults_before_and_after_the_pad(env)
    assert first > 8192 and second > 16384  # glibc maps buffers this large apart and unmaps them when freed


def test_the_reference_row_pads_the_heap_once_after_its_warm_up_and_takes_its_peak_before(monkeypatch):
    said = []
    monkeypatch.setattr(bench, "grow_heap", lambda mb: said.append(("pad", mb)))
    monkeypatch.setattr(bench, "peak_memory_mb", lambda dev: said.append(("peak", None)) or float(len(said)))
    spec = dict(device="cpu", model=dict(n_layer=1, n_head=2, n_embd=32), batch_size=1, seq_len=16, warmup=2, iters=2,
                compile=False, clock=True, heap_pad_mb=64)
    row = bench.time_reference(spec)
    assert said == [("peak", None), ("pad", 64)] and row["peak_mem_mb"] == 1.0
    assert len(row["faults"]) == 2


def test_the_clock_beside_an_iteration_is_the_mean_of_the_ticks_before_and_after_it():
    assert bench.beside({2: 10.0, 3: 12.0, 4: 14.0}, [3, 4]) == [11.0, 13.0]
    assert bench.beside({0: 10.0, 1: 12.0}, [0, 1]) == [10.0, 11.0]  # no warm-up: no tick before iteration 0


def test_the_reference_rows_clock_ticks_are_not_in_its_iterations_ms(monkeypatch):
    def slow_clock():
        return (lambda: time.sleep(0.3) or 1.0), "float32"  # a tick of 300 ms: far longer than a tiny iteration
    monkeypatch.setattr(bench, "matmul_clock", slow_clock)
    spec = dict(device="cpu", model=dict(n_layer=1, n_head=2, n_embd=32), batch_size=1, seq_len=16, warmup=1, iters=3,
                compile=False, clock=True)
    row = bench.time_reference(spec)
    # a tick inside the timing makes every iteration 300 ms or more; the median leaves one slow iteration of a busy
    # machine out (623 ms once, when the whole suite ran beside another job)
    assert row["clock_ms"] == [1.0] * 3 and statistics.median(row["ms"]) < 300


def test_the_reference_row_trains_transformers_gpt2_with_sdpa():
    spec = dict(device="cpu", model=dict(n_layer=2, n_head=2, n_embd=32), batch_size=2, seq_len=16, warmup=1, iters=2)
    row = bench.time_reference(spec)
    assert row["ms_per_iter"] > 0 and row["peak_mem_mb"] > 0 and row["dtype"] in ("fp32", "bf16")


@pytest.mark.usefixtures("compile_fails")
def test_a_reference_row_whose_compile_fails_runs_eager_and_says_why(capsys):
    spec = dict(device="cpu", model=dict(n_layer=1, n_head=2, n_embd=32), batch_size=1, seq_len=16, warmup=0, iters=2,
                compile=True)
    row = bench.time_reference(spec)
    assert row["compile"] == "no" and row["compile_s"] is None and len(row["ms"]) == 2
    assert "compile failed (RuntimeError: no C++ compiler found); running eager" in capsys.readouterr().out


def test_a_compiled_reference_row_reports_its_compile_time_apart_from_its_iterations(monkeypatch):
    # dynamo with its plain backend, not inductor's C++ build (23 s on a fresh machine, the suite's first): what this
    # checks is the row's bookkeeping, not the kernels
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: real_compile(model, backend="eager"))
    spec = dict(device="cpu", model=dict(n_layer=1, n_head=2, n_embd=32), batch_size=1, seq_len=16, warmup=0, iters=2,
                compile=True)
    row = bench.time_reference(spec)
    assert row["compile"] == "yes" and row["compile_s"] > 0
    assert len(row["ms"]) == 2  # the call that compiled is not among the timed ones


@pytest.fixture
def scripted_rows(monkeypatch):
    """bench.main with the workers replaced: each run of a row returns the next of the ms lists given for it."""
    def script(ms_by_row: dict, *flags, peak="1"):
        """ms_by_row: a row's label -> one entry a run: its ms, or (its ms, the clock beside each), or (its ms, the
        clock, the page faults of each), or {"ms": ..., "peak_mem_mb": ...} (1.0 otherwise). script.specs: what each
        worker was asked."""
        asked, left = [], {k: list(v) for k, v in ms_by_row.items()}
        script.specs = []

        def run_worker(spec, label):
            asked.append((label, spec["compile"]))
            script.specs.append(spec)
            ms, clock, faults, peak_mem = left[label].pop(0), None, None, 1.0
            if isinstance(ms, dict):
                ms, peak_mem = ms["ms"], ms["peak_mem_mb"]
            if isinstance(ms, tuple):
                ms, clock, faults = (*ms, None)[:3]
            row = {"ms": ms, "compile_s": None, "compile": "no", "dtype": "fp32", "peak_mem_mb": peak_mem}
            row.update({"faults": faults} if faults else {})
            return {**row, "clock_ms": clock, "clock_dtype": "float32"} if clock else row
        monkeypatch.setattr(bench, "run_worker", run_worker)
        bench.main(["--preset", "tiny", "--device", "cpu", *(["--peak-tflops", peak] if peak else []),
                    "--no-reference", *flags])
        return asked
    return script


def test_every_row_runs_once_a_round_in_a_rotated_order_with_the_control_last(scripted_rows, tmp_path):
    ms = {"10_training": [[1.0]] * 3, "15_grad_accum": [[1.0]] * 3, "15_grad_accum again": [[1.0]] * 3}
    asked = scripted_rows(ms, "--steps", "10,15", "--rounds", "3", "--json", str(tmp_path / "b.json"))
    assert [label for label, _ in asked] == ["10_training", "15_grad_accum", "15_grad_accum again",
                                             "15_grad_accum", "10_training", "15_grad_accum again",
                                             "10_training", "15_grad_accum", "15_grad_accum again"]


def test_without_steps_the_rows_are_the_default_ladder_then_the_control(scripted_rows, tmp_path):
    ms = {label: [[1.0]] for label in [*bench.default_steps(), "16_ddp again"]}
    asked = scripted_rows(ms, "--rounds", "1", "--json", str(tmp_path / "b.json"))
    assert [label for label, _ in asked] == [*bench.default_steps(), "16_ddp again"]


def test_the_default_json_goes_into_runs_made_if_there_is_none(scripted_rows, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no runs/ yet
    scripted_rows({"10_training": [[1.0]], "10_training again": [[1.0]]}, "--steps", "10", "--rounds", "1")
    assert (tmp_path / "runs" / "bench.json").is_file() and (tmp_path / "runs" / "bench.svg").is_file()


def test_on_a_cpu_a_default_run_is_2_rounds_of_3_warm_up_and_3_timed_iterations(scripted_rows, tmp_path):
    # 9 rows x 2 rounds took 10.0 to 14.0 minutes in ten runs on slow 2 cores (docs/bench.md): within 15
    ms = {label: [[1.0]] * 2 for label in [*bench.default_steps(), "16_ddp again"]}
    asked = scripted_rows(ms, "--json", str(tmp_path / "b.json"))
    assert len(asked) == 2 * len(ms)
    assert {(spec["warmup"], spec["iters"]) for spec in scripted_rows.specs} == {(3, 3)}


def test_a_rows_time_is_the_median_of_its_iterations_and_its_spread_the_range_of_its_round_medians(
        scripted_rows, tmp_path):
    ms = {"15_grad_accum": [[100.0, 101.0, 108.0], [110.0, 111.0, 118.0], [104.0, 105.0, 112.0]],  # a slow third
          "15_grad_accum again": [[105.0]] * 3}
    scripted_rows(ms, "--steps", "15", "--rounds", "3", "--json", str(tmp_path / "b.json"))
    row, control = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert row["ms_per_iter"] == 108.0  # the median of the nine timed iterations (their mean: 107.7)
    assert row["round_ms"] == [101.0, 111.0, 105.0]  # medians, not means (103, 113, 107)
    assert row["spread"] == round((111.0 - 101.0) / 108.0, 4)
    assert control["spread"] == 0.0


def test_a_rows_peak_memory_is_the_largest_of_its_rounds(scripted_rows, tmp_path):
    ms = {"15_grad_accum": [{"ms": [1.0], "peak_mem_mb": 5.0}, {"ms": [1.0], "peak_mem_mb": 7.0}],
          "15_grad_accum again": [[1.0]] * 2}
    scripted_rows(ms, "--steps", "15", "--rounds", "2", "--json", str(tmp_path / "b.json"))
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["peak_mem_mb"] == 7.0  # what the row needs


def test_the_noise_line_says_how_far_the_control_is_from_its_row_over_that_rows_time(scripted_rows, tmp_path, capsys):
    ms = {"15_grad_accum": [[100.0]], "15_grad_accum again": [[110.0]]}
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--json", str(tmp_path / "b.json"))
    assert "differs from 15_grad_accum by 10.0%;" in capsys.readouterr().out  # 10 / 100, not 10 / 110


def test_a_rows_ms_are_its_own_not_scaled_by_the_clock_whose_median_it_shows(scripted_rows, tmp_path, capsys):
    ms = {"15_grad_accum": [([100.0, 110.0], [20.0, 22.0])], "15_grad_accum again": [([105.0], [21.0])]}
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--json", str(tmp_path / "b.json"))
    row, control = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert row["ms_per_iter"] == 105.0 and row["clock_ms_median"] == 21.0
    assert row["ms"] == [100.0, 110.0] and row["clock_ms"] == [20.0, 22.0]
    assert re.search(r"^15_grad_accum +105\.0 +- +21\.0 +610 ", capsys.readouterr().out, re.M)  # one round: no spread


def test_a_rows_mfu_is_its_flops_per_second_over_the_peak(scripted_rows, tmp_path):
    ms = {"10_training": [[200.0]], "15_grad_accum": [[100.0]], "15_grad_accum again": [[100.0]]}
    scripted_rows(ms, "--steps", "10,15", "--rounds", "1", "--batch-size", "2", "--json", str(tmp_path / "b.json"),
                  peak="0.1")
    run = json.loads((tmp_path / "b.json").read_text())
    m = run["machine"]
    tokens = m["batch_size"] * m["seq_len"]  # an iteration's: B=2, T=64 (the tiny preset's)
    for row, seconds in zip(run["rows"], [0.2, 0.1, 0.1]):  # MFU 28% and 56% (43,750,656 FLOPs a token)
        # abs=5e-5: the json keeps an MFU to 4 decimals
        assert row["mfu"] == pytest.approx(m["flops_per_token"] * tokens / seconds / (0.1 * 1e12), abs=5e-5), row


def test_vs_10_is_a_rows_tokens_per_s_over_step_10s_wherever_step_10_is_in_the_table():
    row = {"ms_per_iter": 50.0, "spread": 0.0, "clock_ms_median": None, "mfu": None, "peak_mem_mb": 1.0,
           "dtype": "bf16", "compile_s": None, "lesson": "x"}
    # step 10 second, as with --steps 15,10: the base is step 10's row, not the first
    rows = [{**row, "step": "15_grad_accum", "tok_per_s": 640.0}, {**row, "step": "10_training", "tok_per_s": 320.0}]
    lines = bench.table(rows, 1).splitlines()
    assert " 2.00x " in lines[2] and " 1.00x " in lines[3], "\n".join(lines)


def test_a_row_without_a_clock_shows_a_dash_in_the_clock_column():
    row = {"step": "15_grad_accum", "ms_per_iter": 50.0, "spread": 0.0, "clock_ms_median": None, "tok_per_s": 1.0,
           "mfu": None, "peak_mem_mb": 1.0, "dtype": "bf16", "compile_s": None, "lesson": "x"}
    assert re.search(r"^15_grad_accum +50\.0 +0\.0% +- +1 ", bench.table([row], 1), re.M)


def test_a_rows_spread_is_shown_in_percent():
    row = {"step": "15_grad_accum", "ms_per_iter": 50.0, "spread": 0.123, "clock_ms_median": None, "tok_per_s": 1.0,
           "mfu": None, "peak_mem_mb": 1.0, "dtype": "bf16", "compile_s": None, "lesson": "x"}
    assert re.search(r"^15_grad_accum +50\.0 +12\.3% ", bench.table([row], 1), re.M)


def test_a_long_row_name_keeps_the_table_columns_aligned():
    row = {"step": "11_mixed_precision", "ms_per_iter": 50.0, "spread": 0.0, "clock_ms_median": 20.0,
           "tok_per_s": 1.0, "mfu": None, "peak_mem_mb": 1.0, "dtype": "bf16", "compile_s": None, "lesson": "x"}
    lines = bench.table([row, {**row, "step": "11_mixed_precision again"}], 1).splitlines()
    head, short, long = lines[0], lines[2], lines[3]
    assert head.index("ms/iter") + len("ms/iter") == short.index("50.0") + 4 == long.index("50.0") + 4


def test_without_a_given_peak_the_peak_is_the_median_clock_of_the_run(scripted_rows, tmp_path):
    ms = {"15_grad_accum": [([100.0, 100.0], [20.0, 22.0])], "15_grad_accum again": [([100.0], [25.0])]}
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--json", str(tmp_path / "b.json"), peak=None)
    machine = json.loads((tmp_path / "b.json").read_text())["machine"]
    assert machine["peak_tflops"] == pytest.approx(2 * bench.CLOCK_N**3 / 0.022 / 1e12)
    assert machine["median_clock_ms"] == 22.0


def test_too_few_iterations_for_a_correlation_say_so_and_keep_null_not_nan(scripted_rows, tmp_path, capsys):
    ms = {"15_grad_accum": [([100.0], [20.0])], "15_grad_accum again": [([50.0], [24.0])]}  # two points
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--json", str(tmp_path / "b.json"))
    assert "no correlation (too few timed iterations" in capsys.readouterr().out
    assert '"clock_correlation": null' in (tmp_path / "b.json").read_text()  # NaN is not JSON


def test_two_iterations_that_moved_are_too_few_for_a_correlation():
    # two points always lie on a line: a correlation of them would be +1 or -1 whatever the machine did
    assert bench.together({"15_grad_accum": [{"ms": [100.0, 120.0], "clock_ms": [20.0, 24.0]}]}) is None


def test_the_clocks_correlation_with_the_iterations_is_printed_and_kept(scripted_rows, tmp_path, capsys):
    ms = {"15_grad_accum": [([100.0, 120.0], [20.0, 24.0])], "15_grad_accum again": [([50.0, 60.0], [20.0, 24.0])]}
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--json", str(tmp_path / "b.json"))
    assert "correlation 1.00." in capsys.readouterr().out  # every iteration's ms moved with its clock
    assert json.loads((tmp_path / "b.json").read_text())["machine"]["clock_correlation"] == 1.0


def test_a_clock_that_hardly_moved_is_said_to_say_little(scripted_rows, tmp_path, capsys):
    ms = {"15_grad_accum": [([100.0, 120.0], [20.0, 20.5])], "15_grad_accum again": [([100.0, 100.0], [20.0, 20.0])]}
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--json", str(tmp_path / "b.json"))
    assert "the clock moved by less than 5%" in capsys.readouterr().out


def test_one_round_has_no_spread_to_speak_of(scripted_rows, tmp_path, capsys):
    ms = {"15_grad_accum": [[100.0]], "15_grad_accum again": [[100.0]]}
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--json", str(tmp_path / "b.json"))
    out = capsys.readouterr().out
    assert "a spread needs 2 rounds or more" in out and re.search(r"^15_grad_accum +100\.0 +- ", out, re.M)
    assert [r["spread"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]] == [None, None]


def test_on_mps_there_is_no_clock_and_the_peak_is_asked_for(scripted_rows, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(device, "pick", lambda name: torch.device("mps"))
    ms = {"15_grad_accum": [[100.0]], "15_grad_accum again": [[100.0]]}
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--json", str(tmp_path / "b.json"), peak=None)
    assert {spec["clock"] for spec in scripted_rows.specs} == {False}
    assert "peak: unknown (no clock on mps: give --peak-tflops for an MFU)" in capsys.readouterr().out


def test_on_a_cpu_the_workers_pad_the_heap_unless_freed_memory_goes_back(scripted_rows, tmp_path):
    ms = {"15_grad_accum": [[1.0]], "15_grad_accum again": [[1.0]]}
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--json", str(tmp_path / "a.json"))
    assert {spec["heap_pad_mb"] for spec in scripted_rows.specs} == {bench.HEAP_PAD_MB}
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--returned-memory", "--json", str(tmp_path / "b.json"))
    assert {spec["heap_pad_mb"] for spec in scripted_rows.specs} == {0}


def test_without_a_warm_up_no_heap_pad_is_grown_or_claimed(scripted_rows, tmp_path, capsys):
    ms = {"15_grad_accum": [([1.0], [20.0], [5])], "15_grad_accum again": [([1.0], [20.0], [5])]}
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--warmup", "0", "--json", str(tmp_path / "a.json"))
    assert {spec["heap_pad_mb"] for spec in scripted_rows.specs} == {0}
    out = capsys.readouterr().out
    assert "MB of heap grown after the warm-up" not in out and "no warm-up, so no heap grown after it" in out


def test_heap_pad_mb_sets_the_pad_and_0_leaves_it_out_and_says_so(scripted_rows, tmp_path, capsys):
    ms = {"15_grad_accum": [([1.0], [20.0], [5])], "15_grad_accum again": [([1.0], [20.0], [5])]}
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--heap-pad-mb", "512", "--json", str(tmp_path / "a.json"))
    assert {spec["heap_pad_mb"] for spec in scripted_rows.specs} == {512}
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--heap-pad-mb", "0", "--json", str(tmp_path / "b.json"))
    assert {spec["heap_pad_mb"] for spec in scripted_rows.specs} == {0}
    assert "no heap grown after the warm-up (--heap-pad-mb 0)" in capsys.readouterr().out


def test_a_heap_pad_with_returned_memory_is_refused():
    r = make_bench("--heap-pad-mb", "512", "--returned-memory")
    assert r.returncode == 2 and "glibc would hand the pad straight back" in r.stderr and "Traceback" not in r.stderr


def test_a_heap_pad_without_a_warm_up_is_refused():
    r = make_bench("--heap-pad-mb", "512", "--warmup", "0")
    assert r.returncode == 2 and "the pad is grown after the warm-up, and there is none" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_page_faults_of_the_timed_iterations_are_printed_and_kept(scripted_rows, tmp_path, capsys):
    ms = {"15_grad_accum": [([100.0, 100.0], [20.0, 20.0], [0, 7])],
          "15_grad_accum again": [([100.0], [20.0], [3])]}
    scripted_rows(ms, "--steps", "15", "--rounds", "1", "--json", str(tmp_path / "b.json"))
    assert "page faults in the 3 timed iterations: 10, at most 7 in one (15_grad_accum)" in capsys.readouterr().out
    assert json.loads((tmp_path / "b.json").read_text())["rows"][0]["faults"] == [0, 7]


def test_rows_are_compiled_unless_no_compile_is_given(scripted_rows, tmp_path):
    ms = {"15_grad_accum": [[1.0]] * 2, "15_grad_accum again": [[1.0]] * 2}
    compiled = scripted_rows(ms, "--steps", "15", "--rounds", "1", "--json", str(tmp_path / "a.json"))
    eager = scripted_rows(ms, "--steps", "15", "--rounds", "1", "--no-compile", "--json", str(tmp_path / "b.json"))
    assert {c for _, c in compiled} == {True} and {c for _, c in eager} == {False}


@pytest.mark.parametrize("ending, killed", [("kill -9 $$", True), ("exit 1", False)])
def test_a_row_killed_without_a_word_is_said_to_be_most_likely_out_of_memory(tmp_path, monkeypatch, ending, killed):
    # Linux's out-of-memory killer sends SIGKILL: the worker prints nothing, the parent sees exit -9
    worker = tmp_path / "worker"
    worker.write_text(f"#!/bin/sh\necho 'step 10_training on cpu'\n{ending}\n")
    worker.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(worker))  # run_worker starts sys.executable -m shared.bench ...
    with pytest.raises(SystemExit) as exit:
        bench.run_worker({"kind": "10_training"}, "10_training")
    said = str(exit.value.code)
    assert said.startswith("error: the 10_training row failed (exit ") and "step 10_training on cpu" in said
    assert ("killed, most likely by the kernel for want of memory" in said) == killed
