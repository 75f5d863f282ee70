"""The shared test suite runs over every directory in steps/.

A test names the parts of a step it needs with `@pytest.mark.needs("MultiHeadAttention", ...)` and takes a
`step` argument: it then runs once for every step whose model.py defines those names (dotted names, such as
"GPT.from_pretrained", reach into a class). A new step is
covered without editing a list; a part that a later step drops stops being tested there.
`@pytest.mark.main_needs(...)` does the same with the names in the step's __main__.py (what `make step`
runs): the run tests use `main_needs("evaluate")`, the steps whose run trains and reports a validation loss.
`@pytest.mark.main_mentions("--block-size")` picks the steps whose __main__.py has that text (a flag, a call).
`@pytest.mark.check("shapes")` marks one of the four checks every step must have; test_coverage.py fails when a
step has none of a kind. `pytest --step 03_feedforward` (or `make test N=03`) keeps one step's tests.
"""
import importlib
import inspect
import os
from dataclasses import dataclass
from types import ModuleType

import pytest
from hypothesis import settings

from shared.steps import all_steps

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never need the hub
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


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*names): run on every step whose model.py defines these names")
    config.addinivalue_line("markers", "main_needs(*names): run on every step whose __main__.py defines these")
    config.addinivalue_line("markers", "main_mentions(*texts): run on every step whose __main__.py has these texts")
    config.addinivalue_line("markers", f"check(kind): this test is one of the shared checks, kind in {CHECKS}")


def has(obj, dotted: str) -> bool:
    for name in dotted.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def mentions(step: Step, text: str) -> bool:
    return text in inspect.getsource(step.main)


def steps_for(marks, only: str | None = None) -> list[Step]:
    """The steps a test with these marks runs on: those with every name and text its marks ask for."""
    def wanted(kind):
        return [name for m in marks if m.name == kind for name in m.args]

    steps = [Step(s, importlib.import_module(f"steps.{s}.model")) for s in all_steps() if only in (None, s)]
    return [s for s in steps if all(has(s.model, n) for n in wanted("needs"))
            and all(has(s.main, n) for n in wanted("main_needs"))
            and all(mentions(s, t) for t in wanted("main_mentions"))]


def pytest_generate_tests(metafunc):
    if "step" not in metafunc.fixturenames:
        return
    chosen = steps_for(list(metafunc.definition.iter_markers()), metafunc.config.getoption("--step"))
    metafunc.parametrize("step", chosen, ids=[s.name for s in chosen])


def pytest_collection_modifyitems(config, items):
    """A test that applies to none of the selected steps is left out, not reported as skipped."""
    empty = [i for i in items if any(m.kwargs.get("reason", "").startswith("got empty parameter set")
                                     for m in i.iter_markers("skip"))]
    if empty:
        config.hook.pytest_deselected(items=empty)
        items[:] = [i for i in items if i not in empty]
