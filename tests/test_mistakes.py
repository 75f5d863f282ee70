"""make mistake (shared/mistakes.py): the registry stays true to the code, a mistake is made in a copy only, and the
learner sees what caught it. That every mistake is caught on every step it applies to is checked by
`make mistake ARGS=--check`, which CI runs after make test (about 4 minutes here)."""
import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared import mistakes
from shared.steps import ROOT, STEPS_DIR, resolve
from tests.conftest import ctrl_c_as_in_a_terminal, data_dir_copy


def make_mistake(*args):
    return subprocess.run(["make", "-s", "mistake", "ARGS=", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("mistake", mistakes.MISTAKES, ids=lambda m: m.id)
def test_every_mistake_is_a_line_its_own_step_has(mistake):
    steps = mistake.steps()
    assert steps and steps[0] == resolve(mistake.step), f"{mistake.file} of step {mistake.step} lacks {mistake.right!r}"


def test_a_mistake_is_made_in_each_spelling_of_its_line_in_the_steps_it_applies_to(tmp_path):
    kept = mistakes.BY_ID["logits-kept"]  # 12-14 train the compiled model: loss = fast(x, y)[1]
    assert {"12_compile_flash", "14_gpt3_hparams", "15_grad_accum"} <= set(kept.steps())
    for step, wrong in ("10_training", "_, loss = model(x, y)"), ("12_compile_flash", "_, loss = fast(x, y)"):
        copy = tmp_path / "steps" / step / kept.file
        copy.parent.mkdir(parents=True)
        copy.write_text((STEPS_DIR / step / kept.file).read_text())
        assert re.search(rf"^\+ +{re.escape(wrong)}  #", mistakes.make(kept, tmp_path, step), re.M)


def test_the_list_names_every_mistake_with_its_step():
    r = make_mistake()
    assert r.returncode == 0
    for m in mistakes.MISTAKES:
        assert f"{m.id:<30} {m.step:<5} {m.what}" in r.stdout


def test_the_list_of_one_step_names_the_mistakes_in_its_code_and_no_other():
    r = make_mistake("N=08")
    assert r.returncode == 0
    for m in mistakes.MISTAKES:
        assert (f"{m.id:<30} {m.step:<5} {m.what}" in r.stdout) == ("08_gpt2" in m.steps()), m.id


def test_the_curriculums_two_examples_are_registered():
    assert {"untied-head", "heads-merged-wrong"} <= set(mistakes.BY_ID)
    assert "08_gpt2" in mistakes.BY_ID["untied-head"].steps()
    assert mistakes.BY_ID["heads-merged-wrong"].steps()[-1] == sorted(p.name for p in STEPS_DIR.iterdir()
                                                                      if p.is_dir() and p.name[:2].isdigit())[-1]


def tree_digest() -> str:
    files = sorted(p for p in STEPS_DIR.rglob("*.py"))
    return hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()


def test_the_untied_head_in_step_08_shows_163_037_184_parameters_and_exits_0_and_leaves_steps_alone():
    before = tree_digest()
    r = make_mistake("M=untied-head", "N=08")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "-        self.lm_head.weight = self.transformer.wte.weight" in r.stdout  # the diff
    assert "FAILED  test_gpt2_small_has_124_439_808_parameters" in r.stdout
    assert "163,037,184 parameters where 124,439,808 were expected" in r.stdout
    assert "caught: read diary/08_gpt2.md" in r.stdout
    assert tree_digest() == before


@pytest.mark.parametrize("args, message", [
    (["M=no-such-thing"], "no mistake 'no-such-thing'; the ids: sinusoid-halves"),
    (["M=sumed-micro-losses"], "no mistake 'sumed-micro-losses': did you mean summed-micro-losses? (make mistake "
                               "lists them)\n"),  # a typo: the id meant, not all 37
    (["M=untied-hed", "N=03"], "no mistake 'untied-hed': did you mean untied-head? (it applies from step 08 on) "
                               "(make mistake N=03 lists them)\n"),  # a typo of another step's id
    (["M=no-such-thing", "N=08"], "the ids in step 08_gpt2: heads-merged-wrong, heads-viewed-without-transpose, "
                                  "no-causal-mask, pad-sees-nothing, untied-head, exact-gelu\n"),  # only step 08's
    (["M=untied-head", "N=03"], "untied-head is not in step 03_feedforward: it applies to 08_gpt2"),
    (["M=untied-head", "N=99"], "unknown step '99'"),
    (["N=99"], "unknown step '99'"),
])
def test_a_wrong_id_or_step_gets_one_error_line_and_where_the_help_is(args, message):
    r = make_mistake(*args)
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert 'make mistake ARGS="--help" lists every flag' in r.stderr


@pytest.mark.parametrize("args, said", [
    (["--id", "untied-head", "--id", "exact-gelu"], "--id given twice, untied-head and exact-gelu (M= gives --id, N="),
    (["--step", "08", "--step", "10"], "--step given twice, 08 and 10"),
])
def test_a_mistake_or_a_step_given_twice_is_refused_not_the_last_taken(args, said, capsys):
    with pytest.raises(SystemExit) as exit:  # make mistake M=untied-head ARGS="--id exact-gelu" ran exact-gelu
        mistakes.main(args)
    assert exit.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--check", "--id", "untied-head"], ["--check", "--step", "08"]])
def test_check_with_a_mistake_or_a_step_is_refused_not_run_on_every_mistake(args, capsys):
    with pytest.raises(SystemExit) as exit:
        mistakes.main(args)
    assert exit.value.code == 2 and "--check makes every mistake on every step" in capsys.readouterr().err


@pytest.mark.parametrize("mistake", mistakes.MISTAKES, ids=lambda m: m.id)
def test_every_mistake_is_named_in_the_diary_of_its_step(mistake):
    diary = next((ROOT / "diary").glob(f"{resolve(mistake.step)}.md")).read_text()
    assert f"make mistake M={mistake.id}" in diary


def test_after_the_tests_a_learner_is_sent_to_the_diary_of_the_step_the_mistake_was_made_in_where_it_names_it():
    no_mask, untied = mistakes.BY_ID["no-causal-mask"], mistakes.BY_ID["untied-head"]
    assert mistakes.reading(no_mask, "02_attention") == "diary/02_attention.md"  # made there, named there
    assert mistakes.reading(no_mask, "05_decoder") == no_mask.read  # its own pointer, with the section
    assert mistakes.reading(untied, "12_compile_flash") == untied.read  # diary 12 does not name it


def reporting(monkeypatch, results: list[tuple]) -> None:
    """make mistake without its copy, its edit and its pytest run: the mistake's tests report `results`, each
    (test, its parameters, passed / FAILED / ERROR, the first line of what went wrong or None)."""
    monkeypatch.setattr(mistakes, "copy_project", lambda into: into)
    monkeypatch.setattr(mistakes, "make", lambda mistake, root, step: "")
    monkeypatch.setattr(mistakes, "run_tests", lambda root, mistake, step: results)


def test_a_mistake_only_some_of_its_tests_catch_is_not_caught(monkeypatch, capsys):
    untied = mistakes.BY_ID["untied-head"]  # every one of its tests that runs on the step must fail
    reporting(monkeypatch, [(untied.tests[0], "08_gpt2", "FAILED", "assert 163037184 == 124439808"),
                               (untied.tests[1], "08_gpt2", "passed", None)])
    assert mistakes.show(untied, "08_gpt2") == 1
    assert "NOT caught" in capsys.readouterr().out


def test_a_mistake_none_of_whose_tests_runs_on_the_step_is_not_caught(monkeypatch, capsys):
    untied = mistakes.BY_ID["untied-head"]  # a test renamed and not in the registry: pytest -k selects nothing
    reporting(monkeypatch, [])
    assert mistakes.show(untied, "08_gpt2") == 1
    assert "none of its tests runs on step 08_gpt2" in capsys.readouterr().out


def test_a_test_fails_when_any_of_its_cases_does():
    summed = mistakes.BY_ID["summed-micro-losses"]  # k=1 micro-batch cannot catch a sum: k=4 does
    name = summed.tests[0]
    results = [(name, "15_grad_accum-1", "passed", None), (name, "15_grad_accum-4", "FAILED", "assert 4.0 == 1.0")]
    assert mistakes.on(results, "15_grad_accum", summed) == [(name, "FAILED", "assert 4.0 == 1.0")]


def test_a_mistake_whose_tests_could_not_run_is_not_caught(monkeypatch, capsys):
    untied = mistakes.BY_ID["untied-head"]  # data missing: an error in set-up is no failure of the test
    reporting(monkeypatch, [(name, "08_gpt2", "ERROR", 'failed on setup with "SystemExit: error: no data"')
                            for name in untied.tests])
    assert mistakes.show(untied, "08_gpt2") == 1
    out = capsys.readouterr().out
    assert f"ERROR   {untied.tests[0]}" in out and "no data" in out and "\ncaught" not in out
    assert "NOT caught: 2 tests above could not run" in out


@pytest.mark.parametrize("check", [False, True], ids=["one", "check"])
@pytest.mark.parametrize("fault", ["missing", "damaged"])
def test_without_its_data_make_mistake_stops_before_any_test_in_one_line(tmp_path, monkeypatch, check, fault):
    # a test that cannot read its data fails in its body as often as in its set-up: nothing would tell it from a catch
    data_dir_copy(tmp_path, monkeypatch, **{fault: "tinyshakespeare.txt"})
    monkeypatch.setattr(mistakes, "copy_project", lambda into: pytest.fail("work began without the data"))
    with pytest.raises(SystemExit) as exit:
        mistakes.check() if check else mistakes.show(mistakes.BY_ID["untied-head"], "08_gpt2")
    assert str(exit.value.code).startswith(f"error: {tmp_path / 'tinyshakespeare.txt'} is damaged" if fault == "damaged"
                                           else f"error: tinyshakespeare.txt is not in {tmp_path}/")


def test_a_skipped_test_is_no_catch(monkeypatch, capsys):
    untied = mistakes.BY_ID["untied-head"]  # a test that did not run here (no browser, no GPU) caught nothing
    reporting(monkeypatch, [(untied.tests[0], "08_gpt2", "FAILED", "assert 163037184 == 124439808"),
                            (untied.tests[1], "08_gpt2", "skipped", "no GPU")])
    assert mistakes.show(untied, "08_gpt2") == 1
    out = capsys.readouterr().out
    assert f"skipped  {untied.tests[1]}\n          no GPU" in out and "NOT caught" in out


def test_check_fails_a_mistake_whose_tests_could_not_run(monkeypatch, capsys):
    monkeypatch.setattr(mistakes, "MISTAKES", [mistakes.BY_ID["untied-head"]])
    reporting(monkeypatch, [(name, "08_gpt2", "ERROR", "no data") for name in mistakes.BY_ID["untied-head"].tests])
    assert mistakes.check() == 1
    assert "error: untied-head on 08_gpt2: test_gpt2_small_has_124_439_808_parameters could not run: no data" in \
        capsys.readouterr().err


def test_check_fails_a_mistake_one_of_whose_tests_passed(monkeypatch, capsys):
    untied = mistakes.BY_ID["untied-head"]
    monkeypatch.setattr(mistakes, "MISTAKES", [untied])
    monkeypatch.setattr(mistakes.Mistake, "steps", lambda self: ["08_gpt2"])  # the one step the results are of
    reporting(monkeypatch, [(untied.tests[0], "08_gpt2", "FAILED", "assert 163037184 == 124439808"),
                            (untied.tests[1], "08_gpt2", "passed", None)])
    assert mistakes.check() == 1
    out, err = capsys.readouterr()
    assert f"error: untied-head on 08_gpt2: {untied.tests[1]} passed" in err
    assert out.splitlines()[-1] == "1 mistakes, 1 (mistake, step) pairs: 1 not caught"


def test_check_fails_a_mistake_none_of_whose_tests_ran(monkeypatch, capsys):
    # a test renamed and not in the registry: pytest -k selects nothing, and nothing failing is not a catch
    monkeypatch.setattr(mistakes, "MISTAKES", [mistakes.BY_ID["untied-head"]])
    reporting(monkeypatch, [])
    assert mistakes.check() == 1
    assert "error: untied-head on 08_gpt2: none of its tests ran" in capsys.readouterr().err


def test_the_copys_tests_read_the_projects_data_directory_not_one_of_their_own(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT2STEPS_DATA", raising=False)  # a learner's clone: data/ beside the Makefile
    handed = {}
    monkeypatch.setattr(subprocess, "run", lambda cmd, cwd, env, **kw: handed.update(cwd=cwd, env=env))
    with pytest.raises(SystemExit):  # no pytest ran, so no report
        mistakes.run_tests(tmp_path, mistakes.BY_ID["untied-head"], "08_gpt2")
    assert handed["cwd"] == tmp_path and handed["env"]["GPT2STEPS_DATA"] == str(Path.cwd() / "data")  # absolute


def test_ctrl_c_leaves_no_copy_behind(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where tempfile makes the copy
    proc = subprocess.Popen([sys.executable, "-m", "shared.mistakes", "--id", "untied-head"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    for line in proc.stdout:  # the copy is made and its tests are starting
        if line.startswith("running "):
            break
    assert list(tmp_path.glob("gpt2-steps-mistake-*"))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err, err[-2000:]
    assert list(tmp_path.glob("gpt2-steps-mistake-*")) == []
