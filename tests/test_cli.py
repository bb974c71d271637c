"""The CLI as users run it: real processes, exit codes, --json, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, kernel


def cli(*args: str, tmp_path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path), "TAICHI_SANDBOX_LIMITS": str(ROOT / "limits.toml")}
    return subprocess.run([sys.executable, "-m", "sandbox", *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=timeout)


def test_cpu_hog_json_verdict_and_exit_code(tmp_path):
    p = cli("run", kernel("cpu_hog.py"), "--cpu-time", "2s", "--json", tmp_path=tmp_path)
    result = json.loads(p.stdout)
    assert result["verdict"] == "cpu_time" and p.returncode == 123
    assert result["usage"]["wall_seconds"] < 10


def test_ok_summary_and_exit_zero(tmp_path):
    p = cli("run", kernel("saxpy.py"), tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "verdict: ok" in p.stderr and "cpu time" in p.stderr


def test_wall_time_is_124_like_timeout(tmp_path):
    p = cli("run", kernel("sleeper.py"), "--wall-time", "1s", tmp_path=tmp_path)
    assert p.returncode == 124 and "verdict: wall_time" in p.stderr


def test_entry_function_with_json_args(tmp_path):
    p = cli("run", kernel("reduction.py"), "--entry", "sum_of_squares", "--json", "--", "10", tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["return_value"] == 285


def test_script_argv_after_double_dash(tmp_path):
    script = tmp_path / "argv.py"
    script.write_text("import sys\nprint(sys.argv[1:])\n")
    p = cli("run", str(script), "--json", "--", "a", "--b", tmp_path=tmp_path)
    assert json.loads(p.stdout)["stdout_tail"].strip() == "['a', '--b']"


@pytest.mark.parametrize("args,fragment", [
    (["run", "nope.py"], "kernel file not found: nope.py"),
    (["run", kernel("saxpy.py"), "--cpu-time", "-1s"], "command line: cpu_time: must be a finite number >= 0 (got '-1s')"),
    (["run", kernel("saxpy.py"), "--memory", "lots"], "command line: memory: expected a number with a unit"),
    (["run", kernel("saxpy.py"), "--profile", "nope"], "profile: no such profile (got 'nope'; known: "),
    (["run", kernel("saxpy.py"), "--arch", "tpu"], "arch: Input should be 'cpu', 'vulkan'"),
    (["check", "missing.toml"], "missing.toml: limits file not found"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, fragment):
    p = cli(*args, tmp_path=tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and lines[0].startswith("taichi-sandbox: error: ")
    assert "Traceback" not in p.stderr


def test_check_reports_bad_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[profiles.fast]\ncpu_time = \"soon\"\n")
    p = cli("check", str(bad), tmp_path=tmp_path)
    assert p.returncode == 2 and "[profiles.fast]: cpu_time: expected a number with a unit (s, ms, us, m, min, h) (got 'soon')" in p.stderr


def test_check_and_profiles_on_bundled_file(tmp_path):
    assert cli("check", str(ROOT / "limits.toml"), tmp_path=tmp_path).returncode == 0
    p = cli("profiles", tmp_path=tmp_path)
    assert p.returncode == 0 and "training" in p.stdout


def test_probe_reports_archs_nvml_and_enforcement(tmp_path):
    p = cli("probe", "--json", tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["taichi"] == "1.7.4" and report["archs"]["cpu"]["usable"]
    assert set(report["enforcement"]["cpu"]) >= {"cpu_time", "wall_time", "memory", "address_space",
                                                 "gpu_memory", "processes", "output"}
    if not report["nvml"]["available"]:
        assert report["nvml"]["reason"]
        for arch in set(report["enforcement"]) - {"cpu"}:
            gpu = report["enforcement"][arch]["gpu_memory"]
            assert gpu["level"] == "unavailable" and "NVML" in gpu["note"]
    if report["archs"]["vulkan"]["usable"]:
        assert report["enforcement"]["vulkan"]["address_space"]["level"] == "hard"
    cgroups, memory = report["cgroups"], report["enforcement"]["cpu"]["memory"]
    assert cgroups["dmem"] in (True, False) and cgroups["kill"]
    if "memory" in cgroups["enforces"]:
        assert memory["level"] == "hard" and memory["by"].startswith(cgroups["mechanism"])
    else:
        assert memory["level"] == "watched" and memory["by"].startswith("polling") and cgroups["reason"]
    filtered = report["enforcement"]["cpu"]["syscalls"]
    assert report["syscall_filter"] == {"available": True, "reason": ""}  # libseccomp2 is a dependency here
    assert filtered["level"] == "hard" and "CLONE_NEW*" in filtered["by"]


def test_probe_table_names_the_cgroup_mechanism(tmp_path):
    p = cli("probe", tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "cgroups: " in p.stdout and "dmem controller:" in p.stdout and "kill:" in p.stdout
    assert "system-call filter: available" in p.stdout


def test_run_with_arch_gpu_says_where_it_ran(tmp_path):
    p = cli("run", kernel("saxpy.py"), "--arch", "gpu", "--json", tmp_path=tmp_path)
    result = json.loads(p.stdout)
    if result["verdict"] == "rejected":
        assert "no GPU backend usable" in result["reason"] and p.returncode == 117
    else:
        assert result["verdict"] == "ok" and result["arch"] in ("cuda", "vulkan", "opengl")
        assert f"gpu resolved to {result['arch']}" in result["notes"]


def test_batch_manifest_json_lines_and_quota(tmp_path):
    manifest = tmp_path / "jobs.toml"
    manifest.write_text(f'''
[[job]]
kernel = "{kernel("tiny.py")}"
tenant = "default"
[[job]]
kernel = "{kernel("cpu_hog.py")}"
priority = 2
[job.limits]
cpu_time = "1s"
''')
    p = cli("batch", "--manifest", str(manifest), kernel("reduction.py") + ":sum_of_squares", "--json",
            "--concurrency", "2", "--metrics-textfile", str(tmp_path / "m.prom"), tmp_path=tmp_path)
    results = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["verdict"] for r in results] == ["ok", "cpu_time", "ok"] and p.returncode == 1
    assert results[2]["return_value"] == 332833500
    assert 'taichi_sandbox_jobs_total{tenant="default",verdict="ok"} 1.0' in (tmp_path / "m.prom").read_text()
    q = cli("quota", "--json", tmp_path=tmp_path)
    state = json.loads(q.stdout)
    assert state["tenants"]["default"]["running"] == 0 and state["tenants"]["_default"]["violations"] == 1


@pytest.mark.parametrize("manifest,fragment", [
    ("[[job]]\nkernel = 3\n", "job 1: kernel: Input should be a valid string (got 3)"),
    ("[[job]]\nkernel = \"nope.py\"\n", "job 1: kernel file not found: nope.py"),
    ("[[job]]\nkernel = \"x.py\"\n[job.limits]\nmemory = \"much\"\n", "job 1: limits.memory: expected a number with a unit"),
    ("[jobs]\nkernel = \"x.py\"\n", "expected only [[job]] tables"),
])
def test_batch_bad_manifest_is_one_line_exit_2(tmp_path, manifest, fragment):
    (tmp_path / "x.py").write_text("print(1)\n")
    path = tmp_path / "jobs.toml"
    path.write_text(manifest)
    p = cli("batch", "--manifest", str(path), tmp_path=tmp_path)
    assert p.returncode == 2 and fragment in p.stderr and len(p.stderr.strip().splitlines()) == 1
