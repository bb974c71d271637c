"""Every example in examples/ runs for real (arch=cpu, or the GPU arch this machine has; small sizes)
and shows what the README says it shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox import load_policy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, cwd: Path, timeout: float = 120, state: Path | None = None,
                limits: str | None = None) -> subprocess.CompletedProcess:
    """`python examples/NAME ARGS` as a user runs it (as `make demo` does: the repository's limits.toml,
    a state dir of its own), from `cwd`; its exit code and output."""
    env = {**os.environ, "TAICHI_SANDBOX_LIMITS": limits or str(ROOT / "limits.toml"),
           "XDG_STATE_HOME": str(state or cwd / "state"), "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_sandboxed_simulation_returns_the_positions_and_a_sandbox_error(tmp_path):
    p = run_example("sandboxed_simulation.py", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "final positions: float32 (10000, 2)" in p.stdout and "all inside the box: True" in p.stdout
    assert "SandboxError: __main__:too_big: verdict memory" in p.stdout


def test_demo_prints_each_jobs_summary_then_the_table(tmp_path):
    """As `make demo` runs it: from the checkout, the limits file named relative to it."""
    p = run_example("demo.py", "saxpy.py", "cpu_hog.py", "disk_filler.py", cwd=ROOT, state=tmp_path,
                    limits="limits.toml")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for verdict, code in (("ok", 0), ("cpu_time", 123), ("disk", 113)):
        assert f"verdict: {verdict}" in out and f"exit code {code}" in out
    assert "resource" in out and "used (peak)" in out and "violations" in out  # display.summary's tables
    assert "bundled kernels under the sandbox" in out
    assert not list(tmp_path.glob("fill-*")) and not list(ROOT.glob("fill-*"))  # the job's files stay in a temp dir


def test_demo_refuses_an_unknown_job(tmp_path):
    p = run_example("demo.py", "nope.py", cwd=tmp_path)
    assert p.returncode == 1 and "no such demo job: nope.py" in p.stderr


def test_gpu_job_runs_on_the_gpu_arch_here_or_says_why_it_runs_on_cpu(tmp_path):
    p = run_example("gpu_job.py", "64", "20", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "verdict: ok" in p.stdout and "'n': 64, 'steps': 20" in p.stdout
    assert "how each limit was enforced for this job" in p.stdout and "gpu_memory" in p.stdout
    if "no GPU arch here" in p.stdout:
        assert "arch: cpu" in p.stdout
    else:
        assert "arch: cpu" not in p.stdout


def test_shared_node_policy_is_valid():
    policy = load_policy(EXAMPLES / "shared-node.toml")
    assert {"physics", "ml", "ci"} <= set(policy.tenants)


@pytest.mark.slow
def test_ray_batch_runs_sandboxed_jobs_on_a_loopback_cluster(tmp_path):
    pytest.importorskip("ray")
    p = run_example("ray_batch.py", "saxpy.py", "cpu_hog.py", cwd=tmp_path, timeout=90)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "nodes at 127.0.0.1" in p.stdout
    assert "│ saxpy.py" in p.stdout and " ok " in p.stdout and "cpu_time limit" in p.stdout
