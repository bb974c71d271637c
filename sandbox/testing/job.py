"""Inside the job: run one sandboxed test as pytest would, and hand back its pytest outcome as data.

The test's module (and the other modules pytest rewrote for this session's rootdir) come with their
source and are imported here through pytest's assertion rewriter, so a failing `assert` says what
it compared; `pytest.skip()` / `importorskip()` / `xfail()` come back as a return value
`{"outcome": "skipped" | "xfailed", "message": ...}`; everything else propagates as the job's error.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.util
import linecache
from typing import Any

import pytest

from ..core.models import Shipped
from ..core.shipping import receive


class _Rewriter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports the named modules from their shipped source with pytest's asserts rewritten."""

    def __init__(self, modules: dict[str, tuple[str, str]]) -> None:
        self.modules = modules  # name → (file name, source)

    def find_spec(self, name: str, path: Any = None, target: Any = None):
        if name not in self.modules:
            return None
        return importlib.util.spec_from_file_location(name, self.modules[name][0], loader=self)

    def create_module(self, spec):
        return None

    def exec_module(self, module) -> None:
        from _pytest.assertion.rewrite import rewrite_asserts
        filename, source = self.modules[module.__name__]
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        tree = ast.parse(source, filename)
        rewrite_asserts(tree, source.encode(), filename)
        exec(compile(tree, filename, "exec", dont_inherit=True), module.__dict__)


def run_test(test: Shipped, rewritten: dict[str, tuple[str, str]]) -> dict | None:
    """Import the test (its `rewritten` modules through the rewriter), call it with its fixture
    values; a pytest skip or xfail becomes the return value."""
    import sys
    sys.meta_path.insert(0, _Rewriter(rewritten))
    try:
        func, args, kwargs = receive(test)
        func(*args, **kwargs)
    except pytest.skip.Exception as err:
        return {"outcome": "skipped", "message": err.msg or ""}
    except pytest.xfail.Exception as err:
        return {"outcome": "xfailed", "message": err.msg or ""}
    return None
