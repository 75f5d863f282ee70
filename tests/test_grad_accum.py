"""Step 15's lesson and every step after it: gradient accumulation. k micro-batches, each loss divided by k, give
the gradient and the loss of one batch k times as large."""
import copy
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import token_loader

CPU = torch.device("cpu")


def model_and_tokens(step):
    torch.manual_seed(0)
    config = step.model.GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return step.model.GPT(config), torch.randint(100, (1000,))


@pytest.mark.main_needs("accumulate")
@pytest.mark.parametrize("k", [1, 4])  # k = 1: accumulate itself changes nothing (no stray scale or extra step)
def test_k_micro_batches_give_the_gradient_and_loss_of_one_batch_k_times_as_large(step, k):
    model, ids = model_and_tokens(step)
    args = SimpleNamespace(device=CPU, dtype="fp32", rank=0, world=1)  # one process
    loss = step.main.accumulate(model, token_loader(step, ids, batch_size=2, seq_len=16), k, args)
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    x, y = token_loader(step, ids, batch_size=2 * k, seq_len=16).next_batch()  # the same 2k windows, in one batch
    _, big = model(x, y)
    big.backward()
    # fp32: the same sums, added up micro-batch by micro-batch instead of at once (measured: the losses equal, the
    # gradients, below 0.3, within 1.5e-8). 1e-6 is two float32 rounding steps of a loss near 4.6, and 1e-5 of a
    # gradient about a hundred of its own; summing the k losses undivided would be off by a factor of k.
    torch.testing.assert_close(loss, big.detach(), atol=1e-6, rtol=0, msg=lambda _: f"{k} micro-batches log a loss "
                               f"of {loss.item():.4f}, one batch {k} times as large {big.item():.4f}")
    for n, p in model.named_parameters():
        torch.testing.assert_close(accumulated[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.main_needs("accumulate")
def test_summing_the_micro_batch_losses_makes_the_gradient_k_times_larger_but_not_adams_step(step):
    # The mistake of diary 15, made on purpose: k losses summed, not averaged. The gradient is k times too large, but
    # Adam's step m / (sqrt(v) + eps) scales m and sqrt(v) alike, so it is the step of the mean loss wherever |g| is
    # well above eps. (Under SGD the step itself would be k times too large.) No clipping here: with clipping the
    # k-times gradient norm would be clipped back on nearly every step.
    k, args = 4, SimpleNamespace(device=CPU, dtype="fp32", rank=0, world=1)
    averaged, ids = model_and_tokens(step)
    summed = copy.deepcopy(averaged)
    before = [p.detach().clone() for p in averaged.parameters()]
    step.main.accumulate(averaged, token_loader(step, ids, batch_size=2, seq_len=16), k, args)
    loader = token_loader(step, ids, batch_size=2, seq_len=16)
    for _ in range(k):
        x, y = loader.next_batch()
        summed(x, y)[1].backward()  # not divided by k
    for a, b in zip(averaged.parameters(), summed.parameters()):  # the same sums in another order, in fp32
        torch.testing.assert_close(b.grad, k * a.grad, atol=1e-6, rtol=1e-5)  # as in the test above; equal as measured
    for m in (averaged, summed):
        torch.optim.AdamW(step.main.param_groups(m), lr=1e-3, betas=step.main.BETAS, eps=step.main.EPS).step()
    # Adam's first step is lr * g / (|g| + eps) for both. They differ by lr * eps * (k-1) / (k |g|) at most: where
    # |g| > 1000 eps that is under 7.5e-7 (lr 1e-3). Where |g| is near eps (rare tokens' rows) they do differ.
    # Plus ulp: p - p0 is rounded in fp32 at |p| up to 1 (the LayerNorm gains), as in test_gpt3_hparams.py. Measured:
    # 7.43e-7 at a bias of |g| 1.008e-5 (bound 7.44e-7), and a gain at 1.0 lands 6.7e-8 above its own bound.
    ulp = 1.2e-7
    for p0, a, b in zip(before, averaged.parameters(), summed.parameters()):
        big = a.grad.abs() > 1000 * step.main.EPS
        torch.testing.assert_close((b - p0)[big], (a - p0)[big], atol=7.5e-7 + ulp, rtol=0)
        assert (a - p0)[big].abs().max() > 0.9e-3  # each of them moved by about lr: the steps are not both 0


@pytest.mark.main_needs("accumulate")
def test_a_total_batch_that_b_times_t_does_not_divide_is_refused(step, capsys):
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--device", "cpu", "--batch-size", "4", "--seq-len", "32", "--total-batch-size", "1000"])
    assert exit.value.code == 2
    assert ("--total-batch-size 1000 is not a multiple of --batch-size x --seq-len = 4 x 32 = 128 tokens (the nearest "
            "that is: --total-batch-size 1024)") in capsys.readouterr().err


@pytest.mark.main_needs("accumulate")
def test_the_gpt2_preset_steps_with_half_a_million_tokens(step):
    assert step.main.PRESETS["gpt2"]["total_batch_size"] == 524_288 == 2**19
