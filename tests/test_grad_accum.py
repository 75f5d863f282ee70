"""Step 15's lesson and every step after it: gradient accumulation. k micro-batches, each loss divided by k, give
the gradient and the loss of one batch k times as large."""
from types import SimpleNamespace

import pytest
import torch

CPU = torch.device("cpu")


def model_and_tokens(step):
    torch.manual_seed(0)
    config = step.model.GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return step.model.GPT(config), torch.randint(100, (1000,))


@pytest.mark.main_needs("accumulate")
@pytest.mark.parametrize("k", [1, 4])
def test_k_micro_batches_give_the_gradient_and_loss_of_one_batch_k_times_as_large(step, k):
    model, ids = model_and_tokens(step)
    args = SimpleNamespace(device=CPU, dtype="fp32", rank=0, world=1)  # one process
    loss = step.main.accumulate(model, step.main.Loader(ids, batch_size=2, seq_len=16), k, args)
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    x, y = step.main.Loader(ids, batch_size=2 * k, seq_len=16).next_batch()  # the same 2k windows, in one batch
    _, big = model(x, y)
    big.backward()
    # fp32: the same sums, added up micro-batch by micro-batch instead of at once. 1e-6 is about ten float32
    # rounding steps at these values (losses near 4.6, gradients below 1); summing the k losses would be off by k.
    torch.testing.assert_close(loss, big.detach(), atol=1e-6, rtol=0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(accumulated[n], p.grad, atol=1e-6, rtol=1e-5, msg=n)


@pytest.mark.main_needs("accumulate")
def test_a_total_batch_that_b_times_t_does_not_divide_is_refused(step, capsys):
    with pytest.raises(SystemExit) as exit:
        step.main.main(["--device", "cpu", "--batch-size", "4", "--seq-len", "32", "--total-batch-size", "1000"])
    assert exit.value.code == 2
    assert "--total-batch-size 1000 is not a multiple of --batch-size x --seq-len = 4 x 32 = 128" in \
        capsys.readouterr().err


@pytest.mark.main_needs("accumulate")
def test_the_gpt2_preset_steps_with_half_a_million_tokens(step):
    assert step.main.PRESETS["gpt2"]["total_batch_size"] == 524_288 == 2**19
