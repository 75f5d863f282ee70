"""The project's helpers: the step registry behind the Makefile, data files, tokenizers, device, run log."""
import json
import subprocess
import sys
import urllib.error

import pytest
import torch

from shared import data, device, runlog
from shared.steps import all_steps, resolve


def sh(*cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def test_a_step_is_named_by_number_padded_number_or_full_name():
    assert resolve("1") == resolve("01") == resolve("01_embedding") == "01_embedding"


def test_unknown_step_prints_the_list_and_exits_nonzero():
    for n in ("99", "", "embedding"):
        r = sh(sys.executable, "-m", "shared.steps", "resolve", n)
        assert r.returncode == 2 and "01_embedding" in r.stderr and "Traceback" not in r.stderr


def test_make_step_with_an_unknown_step_fails_without_a_traceback():
    r = sh("make", "-s", "step", "N=99")
    assert r.returncode != 0 and "unknown step '99'" in r.stderr and "Traceback" not in r.stderr


def test_make_list_shows_every_step_with_its_lesson():
    out = sh("make", "-s", "list").stdout
    assert all(s in out for s in all_steps()) and "sqrt(d_model)" in out


def test_make_diff_shows_what_a_step_adds():
    r = sh("make", "-s", "diff", "N=02")
    assert r.returncode == 0 and "+def attention(" in r.stdout


def test_make_diff_of_the_first_step_says_there_is_nothing_before_it():
    r = sh("make", "-s", "diff", "N=1")
    assert r.returncode != 0 and "first step" in r.stderr


def test_missing_data_file_offline_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as exit:
        data.shakespeare()
    message = str(exit.value.code)
    assert "tinyshakespeare.txt" in message and str(tmp_path) in message and "GPT2STEPS_DATA" in message


def test_download_with_a_wrong_checksum_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path))

    class Wrong:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            pass

        def read(self):
            return b"not shakespeare"

    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: Wrong())
    with pytest.raises(SystemExit, match="checksum"):
        data.shakespeare()
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_gpt2_tokenizer_works_offline_with_gpt2_ids():
    enc = data.gpt2_tokenizer()
    assert enc.encode("Hello world") == [15496, 995] and enc.encode(" the") == [262]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256


def test_char_tokenizer_round_trips_with_specials_first():
    tok = data.CharTokenizer("hello", specials=("_",))
    assert tok.itos == ["_", "e", "h", "l", "o"] and tok.decode(tok.encode("hello")) == "hello"


def test_random_windows_targets_are_the_inputs_shifted_by_one():
    ids = torch.arange(100)
    x, y = data.random_windows(ids, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and torch.equal(y, x + 1)


def test_unavailable_device_exits_with_a_message():
    for name in ("cuda", "mps"):
        available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}[name]
        if not available:
            with pytest.raises(SystemExit, match=f"--device {name} is not available"):
                device.pick(name)
    assert device.pick("cpu") == torch.device("cpu")


def test_run_log_writes_metrics_summary_and_a_loss_curve(tmp_path, capsys):
    log = runlog.RunLog(tmp_path)
    log.log(0, 2.5, tokens=100)
    log.log(1, 2.0, tokens=100, lr=0.1)
    log.close(val_loss=2.1)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["loss"]) for r in rows] == [(0, 2.5), (1, 2.0)] and rows[1]["lr"] == 0.1
    assert json.loads((tmp_path / "summary.json").read_text()) == {"val_loss": 2.1}
    assert (tmp_path / "loss.svg").read_text().startswith("<svg")
    assert "iter     1 | loss 2.0000" in capsys.readouterr().out
