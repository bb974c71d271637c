"""CI runs every test: `make test` leaves out the long tail, `make test-slow` runs exactly that tail,
and `.ci/run` runs both."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def marker_expression(target: str) -> str:
    """The `-m` expression of pytest in the Makefile's `target` recipe."""
    recipe = re.search(rf"^{re.escape(target)}:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert recipe, f"no target {target} in the Makefile"
    found = re.search(r'pytest .*-m "([^"]+)"', recipe.group(1))
    assert found, recipe.group(1)
    return found.group(1)


def test_make_test_and_make_test_slow_split_the_suite_with_nothing_left_out_or_run_twice():
    fast, slow = marker_expression("test"), marker_expression("test-slow")
    text = (ROOT / "pyproject.toml").read_text()
    markers = re.findall(r'^\s+"(\w+):', text.split("markers = [", 1)[1].split("]", 1)[0], re.M)
    assert {"slow", "soak"} <= set(markers), markers
    for values in itertools.product((False, True), repeat=len(markers)):
        marks = dict(zip(markers, values))
        assert eval(fast, {}, marks) != eval(slow, {}, marks), marks  # noqa: S307 - the Makefile's own text


def test_ci_runs_make_test_then_make_test_slow_even_when_the_first_fails(tmp_path):
    calls = tmp_path / "calls"
    stub = tmp_path / "make"  # a `make` that records its arguments and fails `make test`
    stub.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n[ "$1" != test ]\n')
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    p = subprocess.run([str(ROOT / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert calls.read_text().splitlines() == ["test", "test-slow"], p.stderr
    assert p.returncode != 0  # make test failed: so does CI
    stub.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    assert subprocess.run([str(ROOT / ".ci" / "run")], env=env, timeout=60).returncode == 0
