"""`sandboxed` and the pytest plugin, with real jobs through the default supervisor."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import taichi as ti

import sandbox
from sandbox import SandboxError, Verdict, sandboxed

from .conftest import ROOT


@pytest.fixture
def default_supervisor(tmp_path, monkeypatch):
    """run_kernel's process-wide supervisor, with this test's state dir; closed afterwards."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setenv("TAICHI_SANDBOX_LIMITS", str(ROOT / "limits.toml"))
    monkeypatch.setattr(sandbox.api, "_default", None)
    yield
    if sandbox.api._default is not None:
        sandbox.api._default.close()


@sandboxed(memory="1GiB", cpu_time="20s")
def diffuse(n: int, steps: int) -> np.ndarray:
    u = ti.field(ti.f32, shape=n)

    @ti.kernel
    def step():
        for i in u:
            u[i] = 0.5 * u[i] + (1.0 if i == 0 else 0.0)

    for _ in range(steps):
        step()
    return u.to_numpy()


@sandboxed
def in_job() -> str:
    return os.environ["TAICHI_SANDBOX_JOB"]


@sandboxed(memory="300MiB")
def hog() -> None:
    blocks = [np.ones(64 << 20, np.uint8) for _ in range(16)]
    print(len(blocks))


def test_sandboxed_returns_the_value_or_raises_sandbox_error(default_supervisor):
    u = diffuse(4, 3)
    assert u.dtype == np.float32 and u.tolist() == [1.75, 0, 0, 0]
    assert in_job() and "TAICHI_SANDBOX_JOB" not in os.environ
    with pytest.raises(SandboxError, match="verdict memory") as err:
        hog()
    assert err.value.result.verdict is Verdict.memory and err.value.result.violations
    assert diffuse.__name__ == "diffuse" and sandbox.SandboxError is SandboxError


INNER_TESTS = '''
import os
import numpy as np
import pytest
import taichi as ti


@pytest.mark.sandbox(memory="1GiB", cpu_time="10s")
def test_runs_in_the_sandbox(tmp_path):
    assert os.environ.get("TAICHI_SANDBOX_JOB") and tmp_path.name
    x = ti.field(ti.f32, shape=8)

    @ti.kernel
    def fill():
        for i in x:
            x[i] = i

    fill()
    assert x.to_numpy().sum() == 28


@pytest.mark.sandbox(memory="300MiB")
def test_memory_hog():
    blocks = [np.ones(64 << 20, np.uint8) for _ in range(16)]


@pytest.mark.sandbox(cpu_time="10s")
def test_failing_assert():
    assert 1 + 1 == 3, "arithmetic in the job"


def test_unmarked_runs_here():
    assert not os.environ.get("TAICHI_SANDBOX_JOB")
'''


def test_pytest_marker_runs_the_test_in_the_sandbox(tmp_path):
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TAICHI_SANDBOX_LIMITS": str(ROOT / "limits.toml")}
    # --basetemp: the inner pytest would make /tmp/pytest-of-root 0700 again, closing this directory to the job;
    # writable by its owner only, as a directory above a bound tmp_path must be (sandbox.job.binds)
    tmp_path.chmod(0o755)
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path}/t",
                        "test_inner.py"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert "2 failed, 2 passed" in p.stdout, p.stdout[-4000:]
    assert "FAILED test_inner.py::test_memory_hog - sandbox verdict memory" in p.stdout
    assert "violation: memory" in p.stdout
    assert "AssertionError: arithmetic in the job" in p.stdout


def test_example_returns_the_final_field(tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TAICHI_SANDBOX_LIMITS": str(ROOT / "limits.toml")}
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "sandboxed_simulation.py")], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "final positions: float32 (10000, 2)" in p.stdout and "all inside the box: True" in p.stdout
    assert "verdict memory" in p.stdout
