"""The contract of every step's run (`make step N=..`): core flags, a live log, metrics.jsonl, loss falls,
the same seed gives the same losses, bad flags give a message and a non-zero exit."""
import json

import pytest

RUN = ["--max-steps", "40", "--device", "cpu", "--seed", "0"]


def run(step, tmp_path, *extra):
    step.main.main([*RUN, "--out", str(tmp_path), *extra])
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.main_needs("evaluate")
def test_help_lists_max_steps_device_seed_out(step, capsys):
    with pytest.raises(SystemExit):
        step.main.main(["--help"])
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--max-steps", "--device", "--seed", "--out"))


@pytest.mark.main_needs("evaluate")
def test_short_run_loss_falls_on_real_data(step, tmp_path, capsys):
    rows = run(step, tmp_path)
    losses = [r["loss"] for r in rows]
    assert [r["iter"] for r in rows] == list(range(40))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, f"loss went from {first:.3f} to {last:.3f} in 40 iterations"
    out = capsys.readouterr().out
    assert "shapes through one forward pass" in out and "iter    39" in out  # shapes, then the live log
    assert (tmp_path / "loss.svg").exists() and "val_loss" in json.loads((tmp_path / "summary.json").read_text())


@pytest.mark.main_needs("evaluate")
def test_same_seed_gives_the_same_losses(step, tmp_path):
    a = run(step, tmp_path / "a", "--max-steps", "5")
    b = run(step, tmp_path / "b", "--max-steps", "5")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def exits_with_message(step, argv, capsys, text="error:"):
    with pytest.raises(SystemExit) as exit:
        step.main.main(argv)
    assert exit.value.code == 2  # argparse's exit code for bad usage
    assert text in capsys.readouterr().err


@pytest.mark.main_needs("main")
@pytest.mark.parametrize("bad", [["--device", "tpu"], ["--seed", "x"]])
def test_bad_flags_exit_with_a_message(step, bad, capsys):
    exits_with_message(step, bad, capsys)


@pytest.mark.main_needs("evaluate")
@pytest.mark.parametrize("bad", [["--max-steps", "0"], ["--dropout", "1.5"], ["--lr", "-1"]])
def test_bad_training_flags_exit_with_a_message(step, bad, capsys):
    exits_with_message(step, bad, capsys, text=f"argument {bad[0]}")


@pytest.mark.needs("MultiHeadAttention")
@pytest.mark.main_needs("evaluate")
def test_heads_that_do_not_divide_d_model_are_refused(step, capsys):
    exits_with_message(step, ["--d-model", "30", "--n-heads", "4"], capsys, text="not divisible by --n-heads")
