"""The accelerator paths (make gpu-check runs these): TF32 and bf16, the flash kernel, torch.compile, fused AdamW,
checkpoints across devices, pinned-memory batches, the padded vocabulary, NCCL. Each test is marked gpu; without a
CUDA device they are deselected, not failed. Written before any GPU was lent to this project: see the README."""
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from shared.steps import ROOT
from tests.conftest import small_run_flags
from tests.test_trainer import interrupt_after

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def tf32_as_before(monkeypatch):
    """A test that turns TF32 on or off (choose_dtype turns it on) leaves the next test the setting it found."""
    for backend in (torch.backends.cuda.matmul, torch.backends.cudnn):
        monkeypatch.setattr(backend, "allow_tf32", backend.allow_tf32)


def small_gpt(step, vocab: int = 1000, seed: int = 0):
    torch.manual_seed(seed)
    config = step.model.GPTConfig(block_size=64, vocab_size=vocab, n_layer=2, n_head=4, n_embd=64, dropout=0.0)
    return step.model.GPT(config).to(CUDA)


@pytest.mark.main_needs("choose_dtype")
def test_tf32_is_on_for_fp32_matmuls_and_auto_takes_bf16_from_compute_capability_8(step):
    args = SimpleNamespace(device=CUDA, dtype="auto")
    step.main.choose_dtype(args)
    assert torch.backends.cuda.matmul.allow_tf32
    assert args.dtype == ("bf16" if torch.cuda.get_device_capability(CUDA)[0] >= 8 else "fp32")


@pytest.mark.main_needs("autocast")
def test_bf16_autocast_logits_stay_within_a_few_bf16_steps_of_fp32_on_the_device(step):
    model, idx = small_gpt(step).eval(), torch.randint(1000, (4, 64), device=CUDA)
    with torch.no_grad():
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference in fp32, not TF32
        fp32 = model(idx)[0][..., :1000]
        with step.main.autocast(SimpleNamespace(device=CUDA, dtype="bf16")):
            bf16 = model(idx)[0][..., :1000]
    assert bf16.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: a relative step of 2^-7; 2^-6 of the largest logit is two steps (as on a CPU)
    assert (bf16.float() - fp32).abs().max() <= 2**-6 * fp32.abs().max()


@pytest.mark.needs("attention", "CausalSelfAttention")
@pytest.mark.main_needs("compiled")
@pytest.mark.per_model_file
def test_the_flash_kernel_runs_the_causal_case_and_gives_the_written_out_attention(step):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if torch.cuda.get_device_capability(CUDA) < (8, 0):
        pytest.skip(f"{torch.cuda.get_device_name(CUDA)}: the flash kernel needs compute capability 8.0 (Ampere) on")
    q, k, v = torch.randn(3, 2, 4, 128, 64, device=CUDA, dtype=torch.bfloat16).unbind(0)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if the flash kernel cannot take these inputs
        flash = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    written = step.model.attention(q.float(), k.float(), v.float(), step.model.causal_mask(128, CUDA))[0]
    torch.testing.assert_close(flash.float(), written, atol=2e-2, rtol=0)  # bf16 inputs and output: 2^-7 steps


@pytest.mark.main_needs("compiled")
@pytest.mark.per_model_file  # compiling is slow on a fresh machine: once for each model.py (12, 13, 18)
def test_a_compiled_model_gives_the_eager_logits_on_the_device(step):
    model, idx = small_gpt(step).eval(), torch.randint(1000, (2, 64), device=CUDA)
    torch.backends.cuda.matmul.allow_tf32 = False  # both in fp32: only the fusion differs
    # 1e-4, ten times the CPU test's 1e-5, for CUDA's kernels' other orders of summing: a guess, as no GPU has run this
    # yet (make gpu-check records the difference when one does; tighten it then)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(idx)[0], model(idx)[0], atol=1e-4, rtol=0)


@pytest.mark.main_needs("param_groups")
def test_fused_adamw_gives_the_parameters_of_the_unfused_one(step):
    idx = torch.randint(1000, (4, 65), device=CUDA)
    models = [small_gpt(step) for _ in range(2)]
    opts = [torch.optim.AdamW(step.main.param_groups(m), lr=1e-3, betas=step.main.BETAS, fused=fused)
            for m, fused in zip(models, (True, False))]
    for _ in range(5):
        for model, opt in zip(models, opts):
            opt.zero_grad(set_to_none=True)
            model(idx[:, :-1], idx[:, 1:])[1].backward()
            opt.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0, msg=name)  # the same arithmetic, another kernel


@pytest.mark.main_needs("Loader")
@pytest.mark.first_and_last
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_a_checkpoint_written_on_the_gpu_resumes_on_the_cpu_and_the_other_way(step, tmp_path, monkeypatch, capsys):
    flags = [*small_run_flags(step), "--max-steps", "4", "--seed", "0"]
    flags += ["--dtype", "fp32"] if hasattr(step.main, "choose_dtype") else []  # the dtype is part of the run
    flags += ["--no-compile"] if hasattr(step.main, "compiled") else []  # what is checked is the checkpoint
    for i, (first, then) in enumerate((("cuda", "cpu"), ("cpu", "cuda"))):
        out = tmp_path / f"{i}-{first}-{then}"
        with monkeypatch.context() as m:
            interrupt_after(1, m)  # a Ctrl-C after 2 iterations: the checkpoint holds them
            with pytest.raises(SystemExit):
                step.main.main([*flags, "--device", first, "--out", str(out)])
        step.main.main([*flags, "--device", then, "--out", str(out), "--resume", str(out)])
        assert f"resumed from {out / 'checkpoint.pt'} at iteration 2" in capsys.readouterr().out


@pytest.mark.main_needs("shards")
def test_batches_reach_the_gpu_from_pinned_memory(step, tmp_path, monkeypatch):
    import numpy as np

    np.save(tmp_path / "t_train_000001.npy", np.arange(1000, dtype=np.uint16))
    pinned = []
    pin = torch.Tensor.pin_memory
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: pinned.append(1) or pin(self, *a))
    x, y = step.main.Loader([tmp_path / "t_train_000001.npy"], 4, 8, device=CUDA).next_batch()
    assert pinned and x.device.type == "cuda" and torch.equal(y.cpu(), x.cpu() + 1)


@pytest.mark.needs("GPTConfig.padded_vocab_size")
@pytest.mark.per_model_file
def test_the_padded_ids_are_never_sampled_on_the_device(step):
    model = small_gpt(step, vocab=50257).eval()
    idx = torch.zeros(64, 1, dtype=torch.long, device=CUDA)
    with torch.no_grad():
        assert torch.all(model(idx)[0][..., 50257:] == float("-inf"))  # masked on the device, before any sampling
    out = model.generate(idx, 60, temperature=100.0)  # nearly uniform: every real id is likely, the padding never
    assert out.max().item() < 50257


@pytest.mark.main_needs("join_process_group")
@pytest.mark.first_and_last  # the whole corpus in both runs: torchrun's processes do not see this one's fixtures
def test_under_torchrun_with_nccl_one_process_per_gpu_logs_the_loss_of_one_process(step, tmp_path):
    gpus = torch.cuda.device_count()
    flags = [*small_run_flags(step), "--total-batch-size", str(64 * 4 * gpus), "--max-steps", "3", "--seed", "0",
             "--dtype", "fp32", "--device", "cuda", "--no-compile"]  # NCCL is checked, not compiling
    r = subprocess.run([sys.executable, "-m", "shared.launch", str(gpus), f"steps.{step.name}", *flags, "--out",
                        str(tmp_path / "nccl")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    # on one GPU the one rank still joins an NCCL group of one (and leaves it), but with no other rank there is no
    # DDP to print the backend: only from 2 GPUs on is the line there to check
    assert gpus == 1 or "backend nccl" in r.stdout
    step.main.main([*flags, "--out", str(tmp_path / "one")])
    last = [re.findall(r'"loss": ([0-9.]+)', (tmp_path / d / "metrics.jsonl").read_text())[-1] for d in ("nccl", "one")]
    assert abs(float(last[0]) - float(last[1])) < 1e-4  # the same windows; sums in another order (TF32 is on)
