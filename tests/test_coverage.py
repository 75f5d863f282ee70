"""Every step keeps the four shared checks. Tests pick their steps by the names a step defines, so a rename
would quietly deselect a step's tests; these tests fail instead, naming the step and the missing kind, or the
test that no step is left for. And the suite's own set-up: one thread in each of make test's processes, compiled
modules kept where the machine says not to, and the same random draws whatever ran before."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.steps import ROOT, all_steps
from tests import conftest, refs
from tests.conftest import CHECKS, run_on, steps_for


def shared_checks() -> dict[str, set[str]]:
    """kind -> the steps whose code some test marked @pytest.mark.check(kind) runs on: the steps it is run on, and
    (per_model_file) the steps it is not run on only because their model.py is the step before's."""
    covered = {kind: set() for kind in CHECKS}
    for _, marks in step_tests():  # a test's own marks and its module's: a module's filter narrows its checks too
        picked, ran = {s.name for s in steps_for(marks)}, {s.name for s in run_on(marks)}
        if any(m.name == "per_model_file" for m in marks):  # dropped by run_on: its file, the step before's, ran
            ran |= {s.name for s in steps_for(marks) if conftest.same_model_as_the_step_before(s)
                    and conftest.step_before(s) in picked}
        for kind in (m.args[0] for m in marks if m.name == "check"):
            covered[kind] |= ran
    return covered


@pytest.fixture(scope="module")
def covered() -> dict[str, set[str]]:
    """shared_checks(), worked out once for the four kinds of check (each time took 17 to 22 s in the full suite on
    2 cores)."""
    return shared_checks()


@pytest.mark.parametrize("kind", CHECKS)
def test_every_step_has_each_shared_check(kind, covered):
    missing = [s for s in all_steps() if s not in covered[kind]]
    assert not missing, f"no {kind!r} check runs on {', '.join(missing)}: a rename may have deselected it"


def test_run_on_narrows_the_steps_as_the_marks_say(monkeypatch):
    monkeypatch.delenv("GPT2STEPS_EVERY_STEP", raising=False)  # make mistake's and make book's: every step
    gpt = pytest.mark.needs("GPTConfig", "GPT").mark
    picked = [s.name for s in steps_for([gpt])]
    assert [s.name for s in run_on([gpt, pytest.mark.newest.mark])] == picked[-1:]
    assert [s.name for s in run_on([gpt, pytest.mark.first_and_last.mark])] == [picked[0], picked[-1]]
    per_file = [s.name for s in run_on([gpt, pytest.mark.per_model_file.mark])]
    assert "10_training" in per_file and "11_mixed_precision" not in per_file  # 11's model.py is 10's


def test_ci_runs_the_narrowed_tests_on_every_step_they_apply_to(monkeypatch):
    monkeypatch.setenv("GPT2STEPS_EVERY_STEP", "1")
    gpt = pytest.mark.needs("GPTConfig", "GPT").mark
    picked = steps_for([gpt])
    assert run_on([gpt, pytest.mark.newest.mark]) == run_on([gpt, pytest.mark.first_and_last.mark]) == picked
    every_step = """GPT2STEPS_EVERY_STEP=1 make test ARGS="-m 'first_and_last or newest'\""""
    assert every_step in (ROOT / ".ci/run").read_text()


def test_renaming_a_part_of_a_step_is_reported(monkeypatch):
    """The check above can fail: rename step 01's Embedder, and step 01 has no shapes check left."""
    model = importlib.import_module("steps.01_embedding.model")
    monkeypatch.setattr(model, "TokenEmbedder", model.Embedder, raising=False)
    monkeypatch.delattr(model, "Embedder")
    assert "01_embedding" not in shared_checks()["shapes"]


def step_tests():
    """(file::test, its marks and its module's) for every test that takes a step."""
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for name, marks in conftest.step_tests(importlib.import_module(f"tests.{path.stem}")).items():
            yield f"{path.name}::{name}", marks


def test_every_test_of_a_step_runs_on_some_step():
    lost = [name for name, marks in step_tests() if not run_on(marks)]
    assert not lost, f"no step has what these tests ask for (a part renamed?): {', '.join(lost)}"


def test_a_rename_that_leaves_a_test_no_step_is_reported(monkeypatch):
    """The check above can fail: rename step 18's KVCache, and the KV-cache tests have no step left."""
    model = importlib.import_module("steps.18_kv_cache.model")
    monkeypatch.setattr(model, "Cache", model.KVCache, raising=False)
    monkeypatch.delattr(model, "KVCache")
    assert any(name.startswith("test_kv_cache.py::") for name, marks in step_tests() if not run_on(marks))


def test_one_stages_tests_are_its_own_and_the_shared_code_tests_of_its_files():
    """make test N=11 keeps the tests that run on step 11 and the tests of shared code in the files whose first step
    is 11 (bf16's detection, in test_mixed_precision.py), as the book's page 11 lists them, even asked for by name
    alone; none of a file with no test of a step (test_shared.py here; the bench's, the book's, make data's, make
    mistake's alike). Three files, two of them one test: quick to collect."""
    bf16 = "tests/test_mixed_precision.py::test_bf16_is_native_on_a_gpu_of_compute_capability_8_or_newer"
    stepped = "tests/test_steps.py::test_help_lists_max_steps_device_seed_out"
    r = subprocess.run([sys.executable, "-m", "pytest", "--step", "11", "--collect-only", "-q", "-o", "addopts=",
                        "-p", "no:cacheprovider", "tests/test_shared.py", bf16, stepped],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    ids = [line for line in r.stdout.splitlines() if "::" in line]
    assert r.returncode == 0, r.stdout + r.stderr
    assert not [i for i in ids if i.startswith("tests/test_shared.py::")]
    assert len([i for i in ids if i.startswith(bf16 + "[")]) == 4  # its four GPUs; it takes no step
    assert f"{stepped}[11_mixed_precision]" in ids  # --step 11 is 11_mixed_precision


@pytest.mark.parametrize("given, chosen", [("3", "03_feedforward"), ("03", "03_feedforward"),
                                           ("03_feedforward", "03_feedforward"), (None, None)])
def test_step_takes_a_number_or_a_name(given, chosen):
    assert conftest.chosen_step(given) == chosen


def test_an_unknown_step_stops_pytest_with_one_line_naming_the_steps():
    with pytest.raises(pytest.UsageError, match=r"--step: unknown step '99'; the steps: 01_embedding, "):
        conftest.chosen_step("99")


@pytest.mark.parametrize("worker", ["gw0", None])
def test_a_test_process_of_make_test_runs_on_one_thread_and_pytest_alone_on_torchs_default(worker):
    # make test runs one test process per CPU (pytest-xdist names each in PYTEST_XDIST_WORKER): two threads in each
    # of two processes on two cores oversubscribe; the processes a test starts get one thread too (OMP_NUM_THREADS)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_XDIST_WORKER", "OMP_NUM_THREADS")}
    env |= {"PYTEST_XDIST_WORKER": worker} if worker else {}
    probe = ("import os, torch; default = torch.get_num_threads(); import tests.conftest; "
             "print(default, torch.get_num_threads(), os.environ.get('OMP_NUM_THREADS'))")
    r = subprocess.run([sys.executable, "-c", probe],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    default, threads, omp = r.stdout.split()
    assert (threads, omp) == (("1", "1") if worker else (default, "None"))


def test_make_test_keeps_compiled_test_files_where_pythondontwritebytecode_is_set():
    # set on some machines: then every process the suite starts would compile the project's modules, and pytest
    # rewrite the test files, afresh; the Makefile unsets it for make test (about a fifth of the suite's time:
    # 5 min 32 s against 4 min 37 s)
    cache = ROOT / "tests" / "__pycache__"
    for old in cache.glob("test_embedding.*.pyc"):
        old.unlink()  # written by this suite's own collection, or an earlier one
    r = subprocess.run(["make", "-s", "test", "N=01", "ARGS=--collect-only -q tests/test_embedding.py"], cwd=ROOT,
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    tag = f"{sys.implementation.cache_tag}-pytest-{pytest.__version__}"  # pytest's name for a rewritten test file
    assert [p.name for p in cache.glob("test_embedding.*.pyc")] == [f"test_embedding.{tag}.pyc"]


@pytest.mark.parametrize("turn", ["first", "second"])
def test_every_test_starts_the_reference_weights_draws_from_seed_0(turn):
    # conftest's autouse fixture reseeds refs.DRAWS too: without it the second turn would start where the first left
    # off, and a reference test's weights would depend on which tests ran before it (-k, or make test's processes)
    assert torch.equal(refs.DRAWS.get_state(), torch.Generator().manual_seed(0).get_state())
    refs.distinct_layer_norms(torch.nn.LayerNorm(4))  # draws from it, as a reference test does


def test_every_test_starts_from_torchs_generator_seeded_with_0():
    # conftest's autouse fixture: without it this test would see the state the tests before it in its process left
    # (or torch's own start-up seed, 67280421310721, when it runs first)
    assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(0).get_state())
