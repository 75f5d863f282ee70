"""Step 11's lesson and every trainer after it: bf16 autocast where the hardware computes in bf16, fp32 elsewhere,
TF32 matmuls on CUDA, and a log that says which and why."""
from types import SimpleNamespace

import pytest
import torch

from shared import device
from tests.conftest import small_run_flags

CPU = torch.device("cpu")


@pytest.mark.main_needs("autocast")
def test_bf16_logits_are_within_a_few_bf16_rounding_steps_of_fp32(step):
    torch.manual_seed(0)
    model = step.model.GPT(step.model.GPTConfig(block_size=64, vocab_size=1000, n_layer=2, n_head=4, n_embd=64,
                                                dropout=0.0))
    idx = torch.randint(1000, (4, 65))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(20):  # trained a little, so that the logits are not all near 0
        loss = model(idx[:, :-1], idx[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        fp32 = model(idx[:, :-1])[0][..., :1000]  # the real tokens' logits (step 13 on pads the table)
        with step.main.autocast(SimpleNamespace(device=CPU, dtype="bf16")):
            bf16 = model(idx[:, :-1])[0][..., :1000]
    assert bf16.dtype == torch.bfloat16  # autocast is on: the last matmul ran in bf16
    # bf16 keeps 8 significant bits, so one rounding is off by up to 2^-9 of the value. A logit goes through a few
    # (the inputs of each matmul, its output): 0.37% of the largest logit was measured here; 2^-6 (1.6%) allows
    # four roundings at the largest logit. A matmul left in a lower precision, or wrong weights, is far beyond it.
    tolerance = 2**-6 * fp32.abs().max().item()
    assert 0 < (bf16.float() - fp32).abs().max().item() < tolerance


@pytest.mark.main_needs("autocast")
def test_fp32_leaves_autocast_off(step):
    model = step.model.GPT(step.model.GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16))
    with step.main.autocast(SimpleNamespace(device=CPU, dtype="fp32")):
        assert model(torch.zeros(1, 8, dtype=torch.long))[0].dtype == torch.float32


@pytest.mark.main_needs("autocast")
@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_dtype_auto_follows_the_hardware_and_says_why(step, monkeypatch, native, expected):
    monkeypatch.setattr(device, "bf16_native", lambda d: (native, "because of the test"))
    args = SimpleNamespace(device=CPU, dtype="auto")
    assert step.main.choose_dtype(args) == f"{expected} (because of the test)" and args.dtype == expected


@pytest.mark.main_needs("autocast")
def test_an_explicit_dtype_wins_over_the_hardware(step, monkeypatch):
    monkeypatch.setattr(device, "bf16_native", lambda d: (False, "no bf16 here"))
    args = SimpleNamespace(device=CPU, dtype="bf16")
    assert step.main.choose_dtype(args).startswith("bf16") and args.dtype == "bf16"


@pytest.mark.parametrize("flags, native", [({"avx512_bf16", "avx2"}, True), ({"amx_bf16"}, True), ({"avx2"}, False),
                                           (set(), False)])
def test_bf16_is_native_on_a_cpu_with_avx512_bf16_or_amx(monkeypatch, flags, native):
    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    ok, why = device.bf16_native(CPU)
    assert ok is native and (("has" in why) if native else ("emulated" in why))


@pytest.mark.main_needs("autocast")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_the_log_says_the_dtype_and_why(step, tmp_path, capsys):
    step.main.main(["--device", "cpu", "--seed", "0", *small_run_flags(step), "--max-steps", "1",
                    "--out", str(tmp_path)])
    header = capsys.readouterr().out.splitlines()[0]
    native, why = device.bf16_native(CPU)
    assert f"dtype {'bf16' if native else 'fp32'} ({why})" in header
