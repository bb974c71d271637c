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
    assert "verdict: ok" in p.stdout and "cpu time" in p.stdout


def test_wall_time_is_124_like_timeout(tmp_path):
    p = cli("run", kernel("sleeper.py"), "--wall-time", "1s", tmp_path=tmp_path)
    assert p.returncode == 124 and "verdict: wall_time" in p.stdout


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
    (["run", kernel("saxpy.py"), "--cpu-time", "-1s"], "command line: cpu_time='-1s'"),
    (["run", kernel("saxpy.py"), "--memory", "lots"], "command line: memory='lots'"),
    (["run", kernel("saxpy.py"), "--profile", "nope"], "profile='nope': no such profile"),
    (["run", kernel("saxpy.py"), "--arch", "tpu"], "arch='tpu'"),
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
    assert p.returncode == 2 and "[profiles.fast]: cpu_time='soon'" in p.stderr


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


def test_run_with_arch_gpu_says_where_it_ran(tmp_path):
    p = cli("run", kernel("saxpy.py"), "--arch", "gpu", "--json", tmp_path=tmp_path)
    result = json.loads(p.stdout)
    if result["verdict"] == "rejected":
        assert "no GPU backend usable" in result["reason"] and p.returncode == 3
    else:
        assert result["verdict"] == "ok" and result["arch"] in ("cuda", "vulkan", "opengl")
        assert f"gpu resolved to {result['arch']}" in result["notes"]
