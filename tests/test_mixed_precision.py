"""Step 11's lesson and every trainer after it: bf16 autocast where the hardware computes in bf16, fp32 elsewhere,
TF32 matmuls on CUDA, and a log that says which and why."""
import platform
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
    # bf16 keeps 8 significant bits, so one rounding is off by up to 2^-8 of the value. A logit goes through a few
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


@pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                    reason="x86 Linux lists its CPU's features on a flags line of /proc/cpuinfo")
def test_the_cpus_flags_are_read_from_linuxs_cpuinfo():
    assert {"fpu", "sse2"} <= device.cpu_flags()  # in every x86-64 CPU's flags


def test_bf16_is_not_chosen_automatically_on_mps():
    assert device.bf16_native(torch.device("mps")) == (False, "bf16 autocast is not chosen automatically on mps")


@pytest.fixture
def a_gpu(monkeypatch):
    """a_gpu(name, capability): torch.cuda answers as on that GPU. is_bf16_supported() answers yes, as torch 2.13's
    default (including_emulation=True) does on any GPU where a bf16 tensor can be made (a V100 too): it must not be what
    decides."""
    def gpu(name, capability):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield gpu
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32  # choose_dtype sets them


GPUS = [("Tesla V100", (7, 0), False), ("Tesla T4", (7, 5), False), ("NVIDIA A100", (8, 0), True),
        ("NVIDIA H100", (9, 0), True)]


@pytest.mark.parametrize("name, capability, native", GPUS)
def test_bf16_is_native_on_a_gpu_of_compute_capability_8_or_newer(a_gpu, name, capability, native):
    a_gpu(name, capability)
    ok, why = device.bf16_native(torch.device("cuda"))
    assert ok is native and f"{name} (compute capability {capability[0]}.{capability[1]})" in why
    assert ("computes in bf16" in why) if native else ("emulated" in why and "8.0" in why)


@pytest.mark.main_needs("autocast")
@pytest.mark.parametrize("name, capability, native", GPUS[1:3])
def test_dtype_auto_on_a_gpu_takes_bf16_and_tf32_from_ampere_on_and_says_why(step, a_gpu, name, capability, native):
    a_gpu(name, capability)
    args = SimpleNamespace(device=torch.device("cuda"), dtype="auto")
    note = step.main.choose_dtype(args)
    assert args.dtype == ("bf16" if native else "fp32") and name in note
    assert ("TF32" in note) is native  # a T4 has no TF32 either: the log must not claim it


def test_cpu_autocast_keeps_the_dtype_of_softmax_and_layer_norm_inputs_and_the_loss_in_fp32():
    # What diary 11 says of a CPU: unlike CUDA's autocast, which runs softmax and LayerNorm in fp32, the CPU's
    # runs them in their input's dtype; only the loss is lifted to fp32.
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ x.T).dtype == torch.bfloat16
        assert torch.softmax(x.bfloat16(), -1).dtype == torch.bfloat16
        assert torch.nn.functional.layer_norm(x.bfloat16(), (8,)).dtype == torch.bfloat16
        assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.float32
        assert torch.nn.functional.cross_entropy(x.bfloat16(), torch.zeros(4, dtype=torch.long)).dtype == torch.float32


@pytest.mark.main_needs("autocast")
def test_under_cpu_autocast_the_residual_stream_and_the_loss_stay_fp32_and_the_linears_run_in_bf16(step):
    model = step.model.GPT(step.model.GPTConfig(block_size=8, vocab_size=100, n_layer=1, n_head=2, n_embd=16))
    seen = {}
    for name in ("transformer.h.0.ln_1", "transformer.h.0.attn.c_attn", "transformer.ln_f"):
        model.get_submodule(name).register_forward_hook(
            lambda m, inputs, out, name=name: seen.update({name: (inputs[0].dtype, out.dtype)}))
    idx = torch.zeros(1, 8, dtype=torch.long)
    with step.main.autocast(SimpleNamespace(device=CPU, dtype="bf16")):
        logits, loss = model(idx, idx)
    # The residual stream is fp32 (the embeddings) plus bf16 sub-layer outputs, which type promotion makes fp32:
    # every LayerNorm reads fp32 and, on a CPU, computes in fp32.
    assert seen["transformer.h.0.ln_1"] == seen["transformer.ln_f"] == (torch.float32, torch.float32)
    assert seen["transformer.h.0.attn.c_attn"] == (torch.float32, torch.bfloat16)  # cast on the way in
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32


@pytest.mark.main_needs("autocast")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_the_log_says_the_dtype_and_why(step, tmp_path, capsys):
    step.main.main(["--device", "cpu", "--seed", "0", *small_run_flags(step), "--max-steps", "1",
                    "--out", str(tmp_path)])
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"step {step.name} on"))
    native, why = device.bf16_native(CPU)
    assert f"dtype {'bf16' if native else 'fp32'} ({why})" in header


@pytest.mark.main_needs("autocast")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_a_bf16_run_trains_with_its_linear_layers_in_bf16(step, tmp_path):
    outputs = set()  # the dtypes of the linear layers' outputs in forwards that build a graph for backward

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and torch.is_grad_enabled():
            outputs.add(output.dtype)
    hook = torch.nn.modules.module.register_module_forward_hook(record)  # every module's forward, in this process
    try:
        step.main.main(["--device", "cpu", "--seed", "0", *small_run_flags(step), "--max-steps", "1", "--dtype",
                        "bf16", "--out", str(tmp_path)])
    finally:
        hook.remove()
    assert outputs == {torch.bfloat16}


@pytest.mark.main_needs("autocast")
@pytest.mark.first_and_last  # make mistake M=weights-in-bf16 runs it on every step
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_the_weights_stay_fp32_when_training_in_bf16(step, tmp_path):
    step.main.main(["--device", "cpu", "--seed", "0", *small_run_flags(step), "--max-steps", "2", "--dtype", "bf16",
                    "--out", str(tmp_path)])
    weights = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert {w.dtype for w in weights.values()} == {torch.float32}  # autocast computes in bf16; the weights stay fp32


@pytest.mark.main_needs("autocast")
@pytest.mark.parametrize("name, capability, native", GPUS)
def test_on_any_gpu_fp32_matmuls_are_allowed_tf32(step, a_gpu, name, capability, native):
    a_gpu(name, capability)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # a_gpu puts them back after
    step.main.choose_dtype(SimpleNamespace(device=torch.device("cuda"), dtype="auto"))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32  # older GPUs ignore it


@pytest.mark.main_needs("autocast")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_a_bf16_run_evaluates_with_its_linear_layers_in_bf16(step, tmp_path, monkeypatch):
    outputs, evaluating, evaluate = set(), [], step.main.evaluate  # the linear layers' output dtypes in evaluate()

    def flagged(*args, **kwargs):
        evaluating.append(True)
        try:
            return evaluate(*args, **kwargs)
        finally:
            evaluating.pop()

    def record(module, inputs, output):
        if isinstance(module, torch.nn.Linear) and evaluating:
            outputs.add(output.dtype)
    monkeypatch.setattr(step.main, "evaluate", flagged)
    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        step.main.main(["--device", "cpu", "--seed", "0", *small_run_flags(step), "--max-steps", "1", "--dtype",
                        "bf16", "--out", str(tmp_path)])
    finally:
        hook.remove()
    assert outputs == {torch.bfloat16}  # the validation loss is the loss of the model as it trains
