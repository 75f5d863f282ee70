"""The shared test suite runs over every directory in steps/.

A test names the parts of a step it needs with `@pytest.mark.needs("MultiHeadAttention", ...)` and takes a
`step` argument: it then runs once for every step whose model.py defines those names (dotted names, such as
"GPT.from_pretrained", reach into a class). A new step is
covered without editing a list; a part that a later step drops stops being tested there.
`@pytest.mark.main_needs(...)` does the same with the names in the step's __main__.py (what `make step`
runs): the run tests use `main_needs("evaluate")`, the steps whose run trains and reports a validation loss.
`@pytest.mark.main_mentions("--block-size")` picks the steps whose __main__.py has that text (a flag, a call);
`@pytest.mark.lacks("GPTConfig.padded_vocab_size")` leaves out the steps that define the name;
`@pytest.mark.main_lacks("param_groups")` those whose __main__.py defines it.
`@pytest.mark.per_model_file` marks a test of model.py alone: it runs once per distinct model.py, leaving out a
step whose model.py is byte for byte the step before's (steps 11, 14, 15, 16 and 17 leave it as it was).
`@pytest.mark.first_and_last` and `@pytest.mark.newest` keep a slow test to the first and newest of its steps, or to
the newest; CI runs them on every step too (GPT2STEPS_EVERY_STEP=1, .ci/run). With --step, each of these three runs
on the step asked for.
`@pytest.mark.check("shapes")` marks one of the four checks every step must have; test_coverage.py fails when a
step has none of a kind. `pytest --step 03` (or 3, 03_feedforward, `make test N=03`) keeps one step's tests.
"""
import functools
import importlib
import inspect
import os
import resource
import signal
import tempfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import settings

from shared.steps import STEPS_DIR, all_steps, resolve
from tests import refs

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never need the hub
# `make test N=03` puts N (and MAKEFLAGS, which carries it) in the environment: a make a test starts must not see it
MAKE_VARIABLES = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "N", "M", "ARGS", "NPROC")
for name in MAKE_VARIABLES:
    os.environ.pop(name, None)
if os.environ.get("PYTEST_XDIST_WORKER"):  # make test runs one test process per CPU (pytest-xdist): one thread
    torch.set_num_threads(1)  # each, and for the processes a test starts; two each on two cores oversubscribe
    os.environ["OMP_NUM_THREADS"] = "1"
settings.register_profile("steps", max_examples=20, deadline=None)  # keeps `make test` in minutes on 2 cores
settings.load_profile("steps")


@dataclass
class Step:
    name: str
    model: ModuleType  # steps/NN_name/model.py

    @property
    def main(self) -> ModuleType:  # steps/NN_name/__main__.py: what `make step` runs
        return importlib.import_module(f"steps.{self.name}.__main__")

    def __repr__(self):
        return self.name


def pytest_addoption(parser):
    parser.addoption("--step", default=None, help="only this step's tests, e.g. 03_feedforward")


CHECKS = ("shapes", "parameters", "reference", "loss")  # the four checks every step must have (see test_coverage)


def chosen_step(given: str | None) -> str | None:
    """--step 3, 03 or 03_feedforward -> '03_feedforward'; an unknown step stops pytest with one line."""
    try:
        return None if given is None else resolve(given)
    except ValueError as e:
        raise pytest.UsageError(f"--step: {e}; the steps: {', '.join(all_steps())}") from None


def pytest_configure(config):
    config.option.step = chosen_step(config.option.step)
    config.addinivalue_line("markers", "needs(*names): run on every step whose model.py defines these names")
    config.addinivalue_line("markers", "main_needs(*names): run on every step whose __main__.py defines these")
    config.addinivalue_line("markers", "main_mentions(*texts): run on every step whose __main__.py has these texts")
    config.addinivalue_line("markers", "lacks(*names): leave out the steps whose model.py defines these names")
    config.addinivalue_line("markers", "main_lacks(*names): leave out the steps whose __main__.py defines these")
    config.addinivalue_line("markers", "per_model_file: a test of model.py alone; it leaves out a step whose "
                            "model.py is byte for byte the step before's (that step's run covers it)")
    config.addinivalue_line("markers", f"check(kind): this test is one of the shared checks, kind in {CHECKS}")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; deselected where there is none (make gpu-check)")
    config.addinivalue_line("markers", "first_and_last: a test that starts processes runs on the first and the newest "
                            "of the steps it applies to, and on every one of them in CI")
    config.addinivalue_line("markers", "newest: a slow test of code a step brought and later steps carry unchanged "
                            "runs on the newest of the steps it applies to, and on every one of them in CI")


def has(obj, dotted: str) -> bool:
    for name in dotted.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def mentions(step: Step, text: str) -> bool:
    return text in inspect.getsource(step.main)


# A trainer step (one with --preset) at a size that runs 40 iterations in a few seconds, for the shared run tests.
SMALL_TRAINER = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--batch-size", "2", "--seq-len", "32",
                 "--lr", "3e-3", "--eval-every", "20", "--save-every", "20", "--max-new-tokens", "5"]


def small_run_flags(step: Step) -> list[str]:
    """The flags that make a step's run small enough for a test: SMALL_TRAINER for trainers (with two micro-batches
    an optimizer step from step 15 on), none before them."""
    if not mentions(step, '"--preset"'):
        return []
    return SMALL_TRAINER + (["--total-batch-size", "128"] if mentions(step, '"--total-batch-size"') else [])


@pytest.fixture(autouse=True)
def same_draws_in_any_order():
    """torch's global generator and the reference weights' own (refs.DRAWS) seeded before every test: a test's random
    inputs do not depend on which tests ran before it in the same process (make test spreads the files over processes,
    and -k picks some)."""
    torch.manual_seed(0)
    refs.DRAWS.manual_seed(0)


@pytest.fixture
def first_twentieth_of_the_corpus(monkeypatch):
    """Runs read the first 5% of tiny shakespeare: evaluating the whole validation split at 50257 logits a token
    is most of a short run's time, and a split a twentieth as long keeps `make test` in minutes."""
    from shared import data

    corpus = data.shakespeare()
    monkeypatch.setattr(data, "shakespeare", lambda: corpus[: len(corpus) // 20])


@functools.cache
def kept_until_exit() -> tempfile.TemporaryDirectory:
    """A directory for files that a test's objects may read after the test (a loader's memory-mapped shard), removed
    when the test process exits (TemporaryDirectory's finalizer), not left in /tmp."""
    return tempfile.TemporaryDirectory(prefix="gpt2-steps-tests-")


def token_loader(step: Step, ids: torch.Tensor, batch_size: int, seq_len: int, **kwargs):
    """step.main.Loader over ids: the tensor itself up to step 16; from step 17 on, ids saved as one uint16 shard and
    read in order (no shuffling), whose windows are the same consecutive windows."""
    if not hasattr(step.main, "shards"):
        return step.main.Loader(ids, batch_size, seq_len, **kwargs)
    path = Path(tempfile.mkdtemp(dir=kept_until_exit().name)) / "ids_train_000001.npy"
    np.save(path, ids.numpy().astype(np.uint16))
    return step.main.Loader([path], batch_size, seq_len, shuffle=False, **kwargs)


def data_dir_copy(tmp_path, monkeypatch, damaged: str | None = None, missing: str | None = None) -> None:
    """GPT2STEPS_DATA set to tmp_path, a copy of the data files with one of them cut in half (damaged) or left out
    (missing); and the network down, so that nothing is downloaded in their place."""
    from shared import data

    for name in data.FILES:
        blob = (data.data_dir() / name).read_bytes()
        if name != missing:
            (tmp_path / name).write_bytes(blob[: len(blob) // 2] if name == damaged else blob)
    monkeypatch.setenv("GPT2STEPS_DATA", str(tmp_path))
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)


def with_a_nan_weight(model_dir: Path, into: Path) -> Path:
    """A copy of a model/ directory (config.json, model.safetensors) whose first MLP weight holds a nan: what a run
    that diverged would have saved."""
    from safetensors.torch import load_file, save_file

    into.mkdir(parents=True, exist_ok=True)
    (into / "config.json").write_bytes((model_dir / "config.json").read_bytes())
    state = load_file(model_dir / "model.safetensors")
    state["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(state, into / "model.safetensors", metadata={"format": "pt"})
    return into


def ctrl_c_as_in_a_terminal() -> None:
    """Popen's preexec_fn: Ctrl-C's default action back in the child. A shell's background job (make test &)
    ignores SIGINT, its children inherit that, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def offline(*args, **kwargs):
    raise urllib.error.URLError("no network")


@pytest.fixture
def files_of_at_most_100_kb():
    """Writes past 100 kB fail with EFBIG, part-way through, as on a disk that fills up during the write (the process's
    file size limit, RLIMIT_FSIZE; its signal ignored, so that the write fails instead of killing the process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    yield
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


@pytest.fixture
def compile_fails(monkeypatch, request):
    """torch.compile as on a machine without a C++ compiler: it fails at the first call of the compiled model, with
    the message a test gives (parametrize indirect) or "no C++ compiler found"."""
    message = getattr(request, "param", "no C++ compiler found")

    def broken(model):
        def call(*args, **kwargs):
            raise RuntimeError(message)
        return call
    monkeypatch.setattr(torch, "compile", broken)


def steps_for(marks, only: str | None = None) -> list[Step]:
    """The steps a test with these marks runs on: those with every name and text its marks ask for."""
    def wanted(kind):
        return [name for m in marks if m.name == kind for name in m.args]

    steps = [Step(s, importlib.import_module(f"steps.{s}.model")) for s in all_steps() if only in (None, s)]
    return [s for s in steps if all(has(s.model, n) for n in wanted("needs"))
            and all(has(s.main, n) for n in wanted("main_needs"))
            and all(mentions(s, t) for t in wanted("main_mentions"))
            and not any(has(s.model, n) for n in wanted("lacks"))
            and not any(has(s.main, n) for n in wanted("main_lacks"))]


def step_before(step: Step) -> str | None:
    i = all_steps().index(step.name)
    return all_steps()[i - 1] if i > 0 else None


def same_model_as_the_step_before(step: Step) -> bool:
    model_py = lambda s: (STEPS_DIR / s / "model.py").read_bytes()
    return step_before(step) is not None and model_py(step_before(step)) == model_py(step.name)


def run_on(marks, only: str | None = None) -> list[Step]:
    """The steps a test with these marks is run on: those steps_for picks, then per_model_file drops a step whose
    model.py is the step before's (the same file, tested there), first_and_last keeps the first and the last,
    newest the last. make mistake (its tests) and make book (its list) set GPT2STEPS_EVERY_STEP: no dropping."""
    chosen = steps_for(marks, only)
    marked = set() if os.environ.get("GPT2STEPS_EVERY_STEP") else {m.name for m in marks}
    if "per_model_file" in marked and only is None:  # dropped only where the step before is run (or dropped) too
        names = {s.name for s in chosen}
        chosen = [s for s in chosen if not (same_model_as_the_step_before(s) and step_before(s) in names)]
    if "first_and_last" in marked:
        chosen = chosen[:1] + chosen[1:][-1:]
    if "newest" in marked:
        chosen = chosen[-1:]
    return chosen


def pytest_generate_tests(metafunc):
    if "step" not in metafunc.fixturenames:
        return
    chosen = run_on(list(metafunc.definition.iter_markers()), metafunc.config.getoption("--step"))
    metafunc.parametrize("step", chosen, ids=[s.name for s in chosen])


def step_tests(module: ModuleType) -> dict[str, list]:
    """A test module's tests that take a step: name -> their marks and the module's."""
    module_marks = getattr(module, "pytestmark", [])
    module_marks = [getattr(m, "mark", m) for m in (module_marks if isinstance(module_marks, list) else [module_marks])]
    return {name: [*getattr(fn, "pytestmark", []), *module_marks] for name, fn in vars(module).items()
            if name.startswith("test_") and callable(fn) and "step" in inspect.signature(fn).parameters}


@functools.cache
def first_step_of(module: ModuleType) -> str | None:
    """The first step a test module's tests run on when no step is chosen (the steps their marks pick)."""
    return min((steps[0].name for marks in step_tests(module).values() if (steps := steps_for(marks))), default=None)


def pytest_collection_modifyitems(config, items):
    """A test that applies to none of the selected steps is left out, not reported as skipped; so is a gpu test
    where there is no CUDA device (make gpu-check runs them where there is one). With --step (make test N=..), a
    test that takes no step (a test of shared code) stays only with the first step its file tests, as the book's
    pages list it; the files with no test of a step (the bench's, the book's, make data's, make mistake's, the
    shared helpers' and this suite's own coverage checks) run in the whole suite only."""
    step = config.getoption("--step")

    def left_out(i) -> bool:
        if any(m.kwargs.get("reason", "").startswith("got empty parameter set") for m in i.iter_markers("skip")):
            return True
        if i.get_closest_marker("gpu") and not torch.cuda.is_available():
            return True
        return bool(step) and "step" not in i.fixturenames and first_step_of(i.module) != step

    empty = [i for i in items if left_out(i)]
    if empty:
        config.hook.pytest_deselected(items=empty)
        items[:] = [i for i in items if not left_out(i)]
