"""The shared test suite runs over every directory in steps/.

A test names the parts of a step it needs with `@pytest.mark.needs("MultiHeadAttention", ...)` and takes a
`step` argument: it then runs once for every step whose model.py defines those names (dotted names, such as
"GPT.from_pretrained", reach into a class). A new step is
covered without editing a list; a part that a later step drops stops being tested there.
`@pytest.mark.main_needs(...)` does the same with the names in the step's __main__.py (what `make step`
runs): the run tests use `main_needs("evaluate")`, the steps whose run trains and reports a validation loss.
`pytest --step 03_feedforward` (or `make test N=03`) keeps one step's tests.
"""
import importlib
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


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(*names): run on every step whose model.py defines these names")
    config.addinivalue_line("markers", "main_needs(*names): run on every step whose __main__.py defines these")


def has(obj, dotted: str) -> bool:
    for name in dotted.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def pytest_generate_tests(metafunc):
    if "step" not in metafunc.fixturenames:
        return
    needs = [m.args for m in metafunc.definition.iter_markers("needs")]
    main_needs = [m.args for m in metafunc.definition.iter_markers("main_needs")]
    only = metafunc.config.getoption("--step")
    steps = [Step(s, importlib.import_module(f"steps.{s}.model")) for s in all_steps() if only in (None, s)]
    chosen = [s for s in steps if all(has(s.model, n) for names in needs for n in names)
              and all(has(s.main, n) for names in main_needs for n in names)]
    metafunc.parametrize("step", chosen, ids=[s.name for s in chosen])


def pytest_collection_modifyitems(config, items):
    """A test that applies to none of the selected steps is left out, not reported as skipped."""
    empty = [i for i in items if any(m.kwargs.get("reason", "").startswith("got empty parameter set")
                                     for m in i.iter_markers("skip"))]
    if empty:
        config.hook.pytest_deselected(items=empty)
        items[:] = [i for i in items if i not in empty]
