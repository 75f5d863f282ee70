"""Step 14's lesson and every step after it: GPT-3's optimisation. The learning-rate schedule and the parameter
groups are checked exactly; the run logs the lr it used."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.conftest import small_run_flags

ARGS = SimpleNamespace(lr=6e-4, warmup_steps=10, max_steps=110)


@pytest.mark.main_needs("lr_at")
@pytest.mark.parametrize("it, expected", [
    (0, 6e-4 / 10),  # the first iteration: one tenth of the way up
    (4, 6e-4 * 5 / 10),
    (9, 6e-4),  # the last warmup iteration reaches --lr
    (10, 6e-4),  # the decay starts at the top of the cosine
    (60, 6e-4 * (0.1 + 0.9 * 0.5)),  # half way down: cos(pi / 2) = 0
    (110, 6e-5),  # the end of the decay: 10% of --lr
    (500, 6e-5),  # and after it
])
def test_the_learning_rate_at_each_phase_of_the_schedule(step, it, expected):
    # float64 arithmetic of a few operations (a cosine among them): a few ulps, 1e-16 each; 1e-12 leaves room
    assert step.main.lr_at(it, ARGS) == pytest.approx(expected, rel=1e-12)


@pytest.mark.main_needs("lr_at")
def test_the_decay_never_goes_up(step):
    lrs = [step.main.lr_at(it, ARGS) for it in range(10, 200)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def model_of(step):
    return step.model.GPT(step.model.GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=16))


@pytest.mark.main_needs("param_groups")
def test_exactly_the_matrices_and_embeddings_are_decayed(step):
    model = model_of(step)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed, not_decayed = step.main.param_groups(model)
    assert decayed["weight_decay"] == 0.1 and not_decayed["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decayed["params"]) == sorted(
        ["transformer.wte.weight", "transformer.wpe.weight"] +
        [f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")])
    assert all(n.endswith(".bias") or ".ln_" in n for n in (names[id(p)] for p in not_decayed["params"]))


@pytest.mark.main_needs("param_groups")
def test_every_parameter_is_in_one_group_once(step):
    model = model_of(step)
    grouped = [id(p) for g in step.main.param_groups(model) for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # the tied lm_head is wte: once


@pytest.mark.main_needs("lr_at")
def test_adamw_and_clipping_are_gpt3s(step):
    assert step.main.BETAS == (0.9, 0.95) and step.main.EPS == 1e-8 and step.main.CLIP == 1.0


@pytest.mark.main_needs("param_groups")
def test_adams_first_step_moves_every_weight_by_about_lr_whatever_the_size_of_its_gradient(step):
    # With bias correction, Adam's first m and v are g and g^2: the step is lr * g / (|g| + eps), lr * sign(g) for
    # a gradient of 1e-5 as for one of 1. This is why the first steps want a small lr: the warmup.
    model = model_of(step)
    model(*torch.randint(100, (2, 2, 16)).unbind(0))[1].backward()  # x, y: (2, 16) each
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(step.main.param_groups(model), lr=1e-3, betas=step.main.BETAS, eps=step.main.EPS)
    for group in opt.param_groups:
        group["weight_decay"] = 0.0  # the gradient's step alone
    opt.step()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    moved = torch.cat([(p - p0).abs().flatten() for p, p0 in zip(model.parameters(), before)])
    big = grads.abs() > 1000 * step.main.EPS  # where eps is negligible: lr * (1 - 1e-3) <= step <= lr
    assert grads[big].abs().max() / grads[big].abs().min() > 1e4  # gradients of very different sizes ...
    ulp = 1.2e-7  # p - p0 is rounded in fp32 at |p| up to 1 (the LayerNorm gains)
    assert torch.all((moved[big] > 1e-3 * (1 - 1e-3) - ulp) & (moved[big] < 1e-3 + ulp))  # ... the same step


SCHEDULE = SimpleNamespace(lr=1e-3, warmup_steps=2, max_steps=6)  # optimizer_steps' run


@pytest.fixture(scope="session")
def optimizer_steps(tmp_path_factory):
    """optimizer_steps(step): a 6-iteration fp32 run of SCHEDULE, made once a step and seen three ways.
    .steps: what each AdamW step was given, seen as it begins: the lr, betas and eps of every group and the norm of
    all the gradients. .clips: each clip_grad_norm_ call's max_norm and the norm it returned (the one before the
    clip). .logged: the run's training rows of metrics.jsonl."""
    runs = {}

    def steps_of(step):
        if step.name not in runs:
            seen, clips, out = [], [], tmp_path_factory.mktemp("opt")
            clip = torch.nn.utils.clip_grad_norm_

            def record(opt, args, kwargs):
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                seen.append(([(g["lr"], g["betas"], g["eps"]) for g in opt.param_groups],
                             torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()))

            def recording_clip(parameters, max_norm, *rest, **kwargs):
                norm = clip(parameters, max_norm, *rest, **kwargs)
                clips.append((max_norm, norm.item()))
                return norm
            hook = register_optimizer_step_pre_hook(record)  # every optimizer's step
            try:
                with pytest.MonkeyPatch.context() as m:
                    m.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
                    step.main.main(["--device", "cpu", "--seed", "0", *small_run_flags(step), "--max-steps",
                                    str(SCHEDULE.max_steps), "--warmup-steps", str(SCHEDULE.warmup_steps), "--lr",
                                    str(SCHEDULE.lr), "--dtype", "fp32", "--out", str(out)])
            finally:
                hook.remove()
            runs[step.name] = SimpleNamespace(steps=seen, clips=clips, logged=[
                json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line])
        return runs[step.name]

    return steps_of


@pytest.mark.main_needs("lr_at")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_every_optimizer_step_uses_the_scheduled_lr_and_gpt3s_betas_and_eps(step, optimizer_steps):
    assert [groups for groups, _ in optimizer_steps(step).steps] == [
        [(step.main.lr_at(it, SCHEDULE), step.main.BETAS, step.main.EPS)] * 2 for it in range(6)]  # both groups alike


@pytest.mark.main_needs("lr_at")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_the_log_shows_the_scheduled_lr_of_each_iteration(step, optimizer_steps):
    assert [r["lr"] for r in optimizer_steps(step).logged] == [step.main.lr_at(it, SCHEDULE) for it in range(6)]


@pytest.mark.main_needs("lr_at")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_every_optimizer_step_calls_the_clip_once_with_max_norm_1(step, optimizer_steps):
    assert [max_norm for max_norm, _ in optimizer_steps(step).clips] == [1.0] * 6


@pytest.mark.main_needs("lr_at")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_every_optimizer_step_is_given_gradients_clipped_to_norm_1(step, optimizer_steps):
    run = optimizer_steps(step)
    before_clipping = [r["grad_norm"] for r in run.logged]
    assert len(run.steps) == 6 and min(before_clipping) > 1.05 * step.main.CLIP  # each step's needed it (1.13 at least)
    # fp32: the clipped norm, recomputed. Measured 1 - 6e-7 at most (clip_grad_norm_ scales by 1 / (norm + 1e-6));
    # 1e-5 is some 80 rounding steps at 1.
    assert max(norm for _, norm in run.steps) <= step.main.CLIP * (1 + 1e-5)


@pytest.mark.main_needs("lr_at")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_the_log_shows_the_gradient_norm_before_the_clip(step, optimizer_steps):
    run = optimizer_steps(step)
    assert [r["grad_norm"] for r in run.logged] == [norm for _, norm in run.clips]  # what clip_grad_norm_ returned


@pytest.mark.main_needs("lr_at")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_a_run_shorter_than_its_warmup_says_its_lr_never_reaches_lr(step, tmp_path, capsys):
    step.main.main(["--device", "cpu", "--seed", "0", *small_run_flags(step), "--max-steps", "1", "--warmup-steps", "300",
                    "--max-new-tokens", "1", "--out", str(tmp_path)])
    assert ("note: --warmup-steps 300 is more than --max-steps 1: the lr rises to 0.3% of --lr and no further"
            in capsys.readouterr().out)  # 1/300 to a tenth of a percent: not "0%"


@pytest.mark.main_needs("lr_at")
def test_a_run_shorter_than_its_warmup_only_warms_up(step):
    args = SimpleNamespace(lr=1e-3, warmup_steps=30, max_steps=20)
    assert [step.main.lr_at(it, args) for it in (0, 19)] == pytest.approx([1e-3 / 30, 1e-3 * 20 / 30], rel=1e-12)


@pytest.mark.main_needs("lr_at")
@pytest.mark.usefixtures("first_twentieth_of_the_corpus")
def test_warmup_steps_left_at_0_is_a_tenth_of_max_steps(step, tmp_path, monkeypatch):
    warmups, lr_at = [], step.main.lr_at

    def recording(it, args):
        warmups.append(args.warmup_steps)
        return lr_at(it, args)
    monkeypatch.setattr(step.main, "lr_at", recording)
    step.main.main(["--device", "cpu", "--seed", "0", *small_run_flags(step), "--max-steps", "30", "--eval-every",
                    "100", "--save-every", "100", "--max-new-tokens", "1", "--out", str(tmp_path)])
    assert warmups == [3] * 30  # --help: "0 = 10% of --max-steps"
