"""make bench (shared/bench.py): what it computes and writes, and the flags it refuses. No timing is asserted here:
speeds are what `make bench` measures, on the machine it runs on."""
import json
import subprocess

import pytest

from shared import bench
from shared.steps import ROOT


def test_flops_per_token_of_gpt2_small_is_6n_plus_attention():
    n = 124_439_808 - 1024 * 768  # GPT-2 small with tying, without the position embeddings
    assert bench.flops_per_token(n_layer=12, n_head=12, n_embd=768, seq_len=1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312)])
def test_the_peak_of_a_known_gpu_is_its_datasheet_dense_bf16(name, tflops):
    assert bench.cuda_peak(name, None)[0] == tflops


def test_an_unknown_gpu_has_no_mfu_unless_its_peak_is_given():
    assert bench.cuda_peak("NVIDIA GeForce RTX 4090", None)[0] is None
    assert bench.cuda_peak("NVIDIA GeForce RTX 4090", 165.0) == (165.0, "--peak-tflops")


def test_the_ladder_is_every_step_with_a_training_loop():
    steps = bench.trainer_steps()
    assert steps[0] == "10_training" and "15_grad_accum" in steps


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


def test_generate_past_the_context_is_refused_with_the_flags_to_change():
    r = make_bench("--generate", "--preset", "tiny", "--new-tokens", "50")  # 32 + 50 > the tiny context of 64
    assert r.returncode != 0 and "more than the context of 64 positions" in r.stderr and "--seq-len" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_json_path_that_is_a_directory_is_refused(tmp_path):
    r = make_bench("--json", str(tmp_path))
    assert r.returncode == 2 and "is a directory" in r.stderr and "Traceback" not in r.stderr


def test_a_small_bench_writes_the_table_the_json_and_the_chart(tmp_path, capsys):
    bench.main(["--preset", "tiny", "--seq-len", "16", "--steps", "15", "--iters", "1", "--warmup", "0",
                "--peak-tflops", "1", "--device", "cpu", "--no-reference", "--json", str(tmp_path / "b.json")])
    printed = capsys.readouterr().out
    assert "15_grad_accum" in printed and "6N + 12 L H Q T" in printed
    result = json.loads((tmp_path / "b.json").read_text())
    (row,) = result["rows"]
    assert row["step"] == "15_grad_accum" and row["tok_per_s"] > 0 and 0 < row["mfu"] < 1 and row["peak_mem_mb"] > 0
    assert result["machine"]["flops_per_token"] == bench.flops_per_token(4, 4, 128, 16)
    assert (tmp_path / "b.svg").read_text().startswith("<svg")


def test_the_reference_row_trains_transformers_gpt2_with_sdpa():
    spec = dict(device="cpu", model=dict(n_layer=2, n_head=2, n_embd=32), batch_size=2, seq_len=16, warmup=1, iters=2)
    row = bench.time_reference(spec)
    assert row["ms_per_iter"] > 0 and row["peak_mem_mb"] > 0 and row["dtype"] in ("fp32", "bf16")
