"""A sandboxed test on its way into the job: its fixture values shipped with it (sandbox.core.shipping),
its temporary directories bound into the job (JobSpec.binds), the modules pytest rewrote sent along.

Fixtures that only work in pytest's own process (request, monkeypatch, capsys, ...) are refused by
name before anything is shipped; any other value that cannot be shipped is named after the fixture
that holds it. Either way the error is one line (`CrossingError`) saying what to do instead.

`tmp_path` (and `tmpdir`) is bound as it is; `tmp_path_factory` becomes a factory rooted at a new
directory pytest makes for this test (bound too), so what the job makes with it stays inside.
Only directories pytest made under this session's base temp directory are ever bound.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from ..core.models import Shipped
from ..job.binds import lendable_below
from ..core.shipping import ShippingError, ship

_IN_PYTEST = "use it in a fixture that is not sandboxed and give the test the values it needs"
_OUTPUT = "the job's stdout and stderr show in pytest's captured output; check output in a test that is not sandboxed"
STAYS_OUTSIDE = {
    "request": _IN_PYTEST, "pytestconfig": _IN_PYTEST, "cache": _IN_PYTEST, "pytester": _IN_PYTEST,
    "testdir": _IN_PYTEST, "doctest_namespace": _IN_PYTEST,
    "monkeypatch": "use it in a fixture that is not sandboxed, or set the job's environment with "
                   "@pytest.mark.sandbox(env={...})",
    "capsys": _OUTPUT, "capsysbinary": _OUTPUT, "capfd": _OUTPUT, "capfdbinary": _OUTPUT, "capteesys": _OUTPUT,
    "caplog": "log records stay in the job: log to stderr (it shows in pytest's captured output), or check "
              "logging in a test that is not sandboxed",
    "recwarn": "check warnings inside the test with pytest.warns()",
    "record_property": _IN_PYTEST, "record_xml_attribute": _IN_PYTEST, "record_testsuite_property": _IN_PYTEST,
}
TEMP_FIXTURES = ("tmp_path", "tmpdir")


class CrossingError(Exception):
    """A test that cannot go into the sandbox; the message is one line and says what to do."""


def _refused(name: str, why: str) -> CrossingError:
    return CrossingError(f"fixture {name!r} cannot cross into the sandbox: {why}")


def _no_trace(*args: Any) -> None:
    """The job's tmp_path_factory traces nothing (pytest's tracer stays in pytest's process)."""


def _made_by_pytest(path: Path, factory: pytest.TempPathFactory) -> str:
    """`path` resolved, when it is a directory under the session's base temp directory."""
    real, base = os.path.realpath(path), os.path.realpath(factory.getbasetemp())
    if not real.startswith(base + os.sep) or not os.path.isdir(real):
        raise CrossingError(f"{path} is not a directory pytest made under its base temp directory {base}: "
                            "not bound into the job")
    lendable_below(base)
    return real


def fixtures(item: pytest.Function) -> tuple[dict[str, Any], list[str]]:
    """The test's fixture values as the job gets them, and the directories to bind."""
    factory = item.config._tmp_path_factory  # the session's, as the tmp_path fixtures use it
    values, binds = {}, []
    for name in item._fixtureinfo.argnames:
        if name in STAYS_OUTSIDE:
            raise _refused(name, STAYS_OUTSIDE[name])
        value = item.funcargs[name]
        if name in TEMP_FIXTURES:
            binds.append(_made_by_pytest(value, factory))
        elif name == "tmp_path_factory":
            root = factory.mktemp(re.sub(r"\W", "_", item.name)[:30] + "-factory")
            binds.append(_made_by_pytest(root, factory))
            value = pytest.TempPathFactory(None, 0, "all", _no_trace, basetemp=root, _ispytest=True)
        values[name] = value
    return values, binds


def ship_test(item: pytest.Function, values: dict[str, Any]) -> Shipped:
    """The test function with its fixture values, for sandbox.testing.job.run_test."""
    try:
        return ship(item.obj, (), values)
    except ShippingError as err:
        for name, value in values.items():
            try:
                ship(_no_trace, (value,))
            except ShippingError as own:
                detail = str(own).partition(" (")[2].partition("): ")[0] or str(own)
                raise _refused(name, f"its value cannot be shipped ({detail}); make it picklable, or build "
                                     "it inside the test from values that are") from None
        raise CrossingError(str(err)) from None


def rewritten(item: pytest.Function) -> dict[str, tuple[str, str]]:
    """The modules under the rootdir whose asserts pytest rewrote: name → (file, source)."""
    from _pytest.assertion.rewrite import AssertionRewritingHook
    root = str(item.config.rootpath) + os.sep
    modules = {}
    for name, module in list(sys.modules.items()):
        filename = getattr(module, "__file__", None) or ""
        if isinstance(getattr(module, "__loader__", None), AssertionRewritingHook) and filename.startswith(root):
            try:
                modules[name] = (filename, Path(filename).read_text())
            except (OSError, UnicodeDecodeError):
                continue  # imported without rewriting in the job, as any module
    return modules
