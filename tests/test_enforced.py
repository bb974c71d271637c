"""Every summary says what enforced the job's limits (`JobResult.enforced`): as root with the job's
cgroup, and as a real unprivileged uid where limits are only polled; `probe`'s wording for that uid."""

from __future__ import annotations

import html
import json
import os
import subprocess
import sys

import pytest

from sandbox import JobSpec, Limits

from .conftest import ROOT, kernel, kernel_enforces
from .test_cli import cli
from .test_isolation import AS_UID, OPERATOR_UID

CLI = "import os, sys; os.execv(sys.executable, [sys.executable, '-I', '-m', 'sandbox', *sys.argv[1:]])"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another (unprivileged) uid")


def cli_as_operator(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`python -I -m sandbox ARGS` as OPERATOR_UID, a real unprivileged process, in its own home."""
    home = tmp_path / "operator"
    home.mkdir(exist_ok=True)
    os.chown(home, OPERATOR_UID, OPERATOR_UID)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "XDG_STATE_HOME": str(home / "state"),
           "TAICHI_SANDBOX_LIMITS": str(ROOT / "limits.toml")}
    return subprocess.run([sys.executable, "-c", AS_UID, str(OPERATOR_UID), CLI, *args], capture_output=True,
                          text=True, env=env, cwd=home, timeout=180)


def test_root_summary_and_html_name_the_jobs_cgroup(supervisor, tmp_path):
    if not kernel_enforces(supervisor, "memory"):
        pytest.skip("no job cgroup enforcing memory here")
    result = supervisor.run(JobSpec(kernel=kernel("tiny.py"), limits=Limits(memory="1GiB", cpu_time="10s")))
    assert result.enforced.startswith(f"enforced by {supervisor.cgroups.label} (")
    assert "memory" in result.enforced and "RLIMIT_CPU" in result.enforced and "RLIMIT_AS" in result.enforced
    assert "polled" not in result.enforced
    assert html.escape(result.enforced) in result._repr_html_()
    p = cli("run", kernel("tiny.py"), "--memory", "1GiB", tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"enforced by {supervisor.cgroups.label} (" in " ".join(p.stderr.split())


@needs_root
def test_an_unprivileged_users_summary_says_its_limits_are_polled_and_why(tmp_path):
    p = cli_as_operator(tmp_path, "run", kernel("tiny.py"), "--memory", "1GiB", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    enforced = json.loads(p.stdout)["enforced"]
    polled, why = enforced.split(" — ")[0], enforced.split(" — ")[1].split(";")[0]
    assert polled.startswith("limits polled (") and "memory" in polled and "not root" in why, enforced
    assert "enforced by RLIMIT_CPU + RLIMIT_AS" in enforced and "cgroup v" not in enforced.split(";")[1]
    p = cli_as_operator(tmp_path, "run", kernel("tiny.py"), "--memory", "1GiB")
    assert polled in " ".join(p.stderr.split()), p.stderr


@needs_root
def test_probe_for_an_unprivileged_user_does_not_talk_about_root(tmp_path):
    p = cli_as_operator(tmp_path, "probe", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    processes = json.loads(p.stdout)["enforcement"]["cpu"]["processes"]
    assert processes["level"] == "watched" and "root" not in processes["by"], processes
    assert "not root" in processes["note"]
