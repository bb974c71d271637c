"""`taichi-sandbox run`/`batch` as a user sees them: live output, exit statuses, Ctrl-C/SIGTERM,
arch warnings, limit typos and the policy that applies outside the repository."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, kernel
from .test_cli import cli


def write(tmp_path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text(body)
    return str(path)


def audit_records(tmp_path) -> list[dict]:
    """The audit log's job records (one per verdict)."""
    path = tmp_path / "taichi-sandbox" / "audit.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in records if r["type"] == "job"]


def _started(tmp_path) -> bool:
    """Whether the audit log has a job's `started` record."""
    path = tmp_path / "taichi-sandbox" / "audit.jsonl"
    return path.exists() and '{"type":"started"' in path.read_text()


def test_job_output_streams_to_our_stdout_and_the_summary_to_stderr(tmp_path):
    job = write(tmp_path, "minimal.py", "import sys\nprint(42)\nprint('warn', file=sys.stderr)\n")
    p = cli("run", job, tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "42\n"
    assert p.stderr.startswith("warn\n") and "verdict: ok" in p.stderr


def test_json_keeps_stdout_pure_and_the_jobs_output_goes_to_stderr(tmp_path):
    job = write(tmp_path, "minimal.py", "print(42)\n")
    p = cli("run", job, "--json", tmp_path=tmp_path)
    assert json.loads(p.stdout)["verdict"] == "ok" and p.stderr == "42\n"


@pytest.mark.parametrize("status,expected", [(3, 3), (112, 112), (113, 1), (114, 1), (1, 1), (2, 1), (200, 1)])
def test_scripts_own_exit_status_passes_through_outside_the_sandboxs_codes(tmp_path, status, expected):
    job = write(tmp_path, "exits.py", f"import sys\nsys.exit({status})\n")
    p = cli("run", job, tmp_path=tmp_path)
    assert p.returncode == expected
    assert f"exit status {status}" in p.stderr and "Traceback" not in p.stderr


def test_max_result_on_the_command_line(tmp_path):
    job = write(tmp_path, "big.py", "def main():\n    return 'x' * 100_000\n")
    p = cli("run", job, "--entry", "main", "--max-result", "10KiB", tmp_path=tmp_path)
    assert p.returncode == 114 and "verdict: result" in p.stderr, p.stderr
    assert cli("run", job, "--entry", "main", "--max-result", "1MiB", "--json", tmp_path=tmp_path).returncode == 0


def test_sandbox_verdict_codes_stay_apart_from_job_statuses(tmp_path):
    p = cli("run", kernel("saxpy.py"), "--tenant", "nobody", tmp_path=tmp_path)
    assert p.returncode == 2  # no such tenant: a usage error
    p = cli("run", kernel("segfault.py"), tmp_path=tmp_path)
    assert p.returncode == 116 and "verdict: crashed" in p.stderr


def _start(tmp_path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path), "TAICHI_SANDBOX_LIMITS": str(ROOT / "limits.toml")}
    # SIGINT as an interactive shell leaves it (a background shell starts everything with it ignored)
    return subprocess.Popen([sys.executable, "-m", "sandbox", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_on_run_cancels_the_job_prints_and_audits_it(tmp_path, signum, code):
    job = write(tmp_path, "slow.py", "import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    proc = _start(tmp_path, "run", job)
    try:
        assert proc.stdout.readline() == "started\n"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "verdict: cancelled" in err and "Traceback" not in err
    assert [r["verdict"] for r in audit_records(tmp_path)] == ["cancelled"]


def test_sigint_on_batch_cancels_running_and_queued_jobs(tmp_path):
    job = write(tmp_path, "slow.py", "import time\ntime.sleep(60)\n")
    proc = _start(tmp_path, "batch", job, job, job, "--concurrency", "1", "--json")
    try:
        deadline = time.monotonic() + 60
        while not _started(tmp_path):  # the first job running, the other two queued
            assert time.monotonic() < deadline, "the first job never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["verdict"] for r in results] == ["cancelled"] * 3
    assert sorted(r["verdict"] for r in audit_records(tmp_path)) == ["cancelled"] * 3
    assert "Traceback" not in err


def test_job_asking_for_another_arch_gets_a_warning_and_a_note(tmp_path):
    job = write(tmp_path, "wants_gpu.py", "import taichi as ti\nti.init(arch=ti.gpu)\n")
    p = cli("run", job, tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "WARNING: the job's ti.init asked for arch=gpu but it ran on cpu" in p.stderr
    result = json.loads(cli("run", job, "--json", tmp_path=tmp_path).stdout)
    assert any(n.startswith("WARNING: the job's ti.init asked for arch=gpu") for n in result["notes"])
    quiet = write(tmp_path, "cpu.py", "import taichi as ti\nti.init(arch=ti.cpu)\n")
    assert not any("WARNING" in n for n in json.loads(cli("run", quiet, "--json", tmp_path=tmp_path).stdout)["notes"])


@pytest.mark.parametrize("args,fragment", [
    (["--memory", "1", "GiB"], "unexpected argument 'GiB'"),
    (["--memory", "4096"], "memory: without a unit this is bytes, under 1 MiB: likely a typo"),
    (["--cpu-time", "0.005"], "cpu_time: without a unit this is seconds, under 10 ms"),
    (["--wall-time", "0.001"], "(got '0.001')"),
])
def test_unitless_tiny_limits_are_likely_typos(tmp_path, args, fragment):
    p = cli("run", kernel("saxpy.py"), *args, tmp_path=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and fragment in lines[0] and "unit" in lines[0]


def test_outside_the_repository_the_bundled_defaults_apply_and_are_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TAICHI_SANDBOX_LIMITS"}
    env["XDG_STATE_HOME"] = str(tmp_path)

    def bare_cli(*args):
        return subprocess.run([sys.executable, "-m", "sandbox", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)
    p = bare_cli("run", kernel("tiny.py"), "--json")
    limits = json.loads(p.stdout)["limits"]
    assert (limits["cpu_time"], limits["wall_time"], limits["memory"]) == (60.0, 120.0, 2 << 30)
    p = bare_cli("run", kernel("tiny.py"))
    assert "policy: " in p.stderr and "limits.toml (bundled" in p.stderr
    assert "(bundled" in bare_cli("profiles").stdout


def test_bundled_file_says_what_jobs_without_a_tenant_get():
    from sandbox.core.limits import BUNDLED_POLICY, Policy
    policy = Policy.load(BUNDLED_POLICY)
    assert policy.resolve() == policy.defaults != policy.resolve(tenant="default")
    text = BUNDLED_POLICY.read_text()
    tenant_comment = text[text.index("[tenants.default]"):text.index("[job_types.test]")]
    assert "Jobs without a tenant are not in it: they get\n# [defaults]" in tenant_comment
