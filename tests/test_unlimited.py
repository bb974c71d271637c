""""unlimited" and "none" through each Python way in, with real jobs: run_kernel(limits={...}),
@sandboxed(...) and @pytest.mark.sandbox(...); a misspelt limit is one line that suggests the
closest name (the marker: at collection; the CLI and limits.toml: test_cli_hygiene, test_fuzz)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sandbox import ConfigError, run_kernel, sandboxed

from .conftest import ROOT
from .test_decorator import default_supervisor  # noqa: F401 - the fixture

UNLIMITED = {"cpu_time": "unlimited", "wall_time": "none", "memory": "unlimited", "address_space": "none",
             "max_processes": "unlimited", "max_output": "none", "max_result": "unlimited", "disk": "unlimited"}


def triple(x: int) -> int:
    return 3 * x


@sandboxed(**UNLIMITED)
def triple_unlimited(x: int) -> int:
    return 3 * x


def test_run_kernel_and_sandboxed_take_unlimited(default_supervisor):
    result = run_kernel(triple, limits=UNLIMITED, args=[5])
    assert result.ok and result.return_value == 15, result.reason
    assert all(getattr(result.limits, name) is None for name in UNLIMITED)
    assert triple_unlimited(7) == 21


def test_a_misspelt_limit_suggests_the_closest(default_supervisor):
    with pytest.raises(ConfigError, match=r"^Limits: memroy: unknown key \(did you mean 'memory'\?\)$"):
        run_kernel(triple, limits={"memroy": "1GiB"}, args=[1])
    with pytest.raises(ConfigError, match=r"^Limits: cpu_time: must be a finite number >= 0 \(got '-1s'\)$"):
        sandboxed(cpu_time="-1s")(triple)(1)


UNLIMITED_TEST = '''
import pytest

@pytest.mark.sandbox(cpu_time="unlimited", wall_time="none", memory="unlimited", max_processes="unlimited")
def test_unlimited():
    assert 1 + 1 == 2
'''

MISSPELT_TEST = '''
import pytest

@pytest.mark.sandbox(memroy="1GiB")
def test_misspelt():
    pass
'''


def test_pytest_marker_takes_unlimited_and_names_a_misspelt_limit(tmp_path):
    (tmp_path / "test_unlimited_inner.py").write_text(UNLIMITED_TEST)
    (tmp_path / "test_misspelt_inner.py").write_text(MISSPELT_TEST)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TAICHI_SANDBOX_LIMITS": str(ROOT / "limits.toml")}

    def pytest_run(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"--basetemp={tmp_path}/t", name], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
    ran = pytest_run("test_unlimited_inner.py")
    assert ran.returncode == 0 and "1 passed" in ran.stdout, ran.stdout[-4000:]
    refused = pytest_run("test_misspelt_inner.py")
    output = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "'memroy' (did you mean 'memory'?)" in output, output[-4000:]
    assert "Traceback" not in output
