"""What a researcher types, and what comes back: the script's argv only after `--`, `--entry` checked
before any job starts (without running their file), "unlimited" for every limit option, one-line
errors without a traceback, durations written as people write them, a short `print(result)`."""

from __future__ import annotations

import json

import pytest

from sandbox import JobResult
from sandbox.core.units import duration, parse_duration

from .conftest import kernel
from .test_cli import cli

SCRIPT = """\
import sys
if True:
    def simulate(n=1):
        return n * 2
def _helper():
    pass
print("argv", sys.argv[1:])
"""


def _one_line_error(p, *fragments: str) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("taichi-sandbox: error: ") and all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


@pytest.mark.parametrize("args,fragments", [
    (["--wall-time", "5", "min"], ["unexpected argument 'min'", "after '--'", "write it as one word: --wall-time 5min"]),
    (["--memory", "1", "GiB"], ["unexpected argument 'GiB'", "--memory 1GiB"]),
    (["input.npy"], ["unexpected argument 'input.npy'", "run FILE [OPTIONS] -- ARGS"]),
])
def test_a_stray_word_is_an_error_not_the_scripts_argv(tmp_path, args, fragments):
    (tmp_path / "k.py").write_text(SCRIPT)
    _one_line_error(cli("run", "k.py", *args, tmp_path=tmp_path), *fragments)
    _one_line_error(cli("run", "k.py", *args, "--socket", str(tmp_path / "no.sock"), tmp_path=tmp_path), *fragments)


def test_script_argv_goes_after_double_dash_and_help_says_so(tmp_path):
    (tmp_path / "k.py").write_text(SCRIPT)
    p = cli("run", "k.py", "--wall-time", "5min", "--", "5", "min", "--memory", tmp_path=tmp_path)
    assert p.returncode == 0 and "argv ['5', 'min', '--memory']" in p.stdout, p.stderr
    assert "After '--'" in cli("run", "--help", tmp_path=tmp_path).stdout


@pytest.mark.parametrize("target,fragments", [
    (["k.py", "--entry", "simulat"], ["entry 'simulat': no function 'simulat' in k.py; did you mean 'simulate'?"]),
    (["k.py:zzz_nothing_alike"], ["no function 'zzz_nothing_alike' in k.py (it defines: ", "simulate"]),
    (["json:dumpz"], ["no function 'dumpz' in json; did you mean 'dump"]),
    (["no_such_module_here:f"], ["kernel 'no_such_module_here': no module named 'no_such_module_here'"]),
])
def test_entry_is_checked_before_the_job_without_running_the_file(tmp_path, target, fragments):
    (tmp_path / "k.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n" + SCRIPT)
    _one_line_error(cli("run", *target, "--", "3", tmp_path=tmp_path), *fragments)
    _one_line_error(cli("run", *target, "--socket", str(tmp_path / "no.sock"), tmp_path=tmp_path), *fragments)
    assert not (tmp_path / "ran").exists() and not (tmp_path / "state").exists()  # no job, no supervisor


def test_an_entry_that_exists_runs(tmp_path):
    (tmp_path / "k.py").write_text(SCRIPT)
    (tmp_path / "star.py").write_text("from json import *\n")  # names unknown without running it: left to the job
    p = cli("run", "k.py", "--entry", "simulate", "--json", "--", "21", tmp_path=tmp_path)
    assert p.returncode == 0 and json.loads(p.stdout)["return_value"] == 42, p.stderr
    assert cli("run", "star.py:dumps", "--json", "--", "[1]", tmp_path=tmp_path).returncode == 0


def test_every_limit_option_takes_unlimited(tmp_path):
    p = cli("run", kernel("tiny.py"), "--json", "--cpu-time", "unlimited", "--wall-time", "none", "--memory", "unlimited",
            "--address-space", "unlimited", "--gpu-memory", "none", "--max-processes", "unlimited", "--max-output",
            "unlimited", "--max-result", "unlimited", "--disk", "none", tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    limits = json.loads(p.stdout)["limits"]
    assert all(limits[name] is None for name in ("cpu_time", "wall_time", "memory", "address_space", "gpu_memory",
                                                  "max_processes", "max_output", "max_result", "disk"))
    _one_line_error(cli("run", kernel("tiny.py"), "--grace", "unlimited", tmp_path=tmp_path),
                    "grace: cannot be unlimited")


def test_unknown_keys_suggest_the_closest(tmp_path):
    bad = tmp_path / "limits.toml"
    bad.write_text('[defualts]\n')
    _one_line_error(cli("check", str(bad), tmp_path=tmp_path), "unknown table [defualts] (did you mean [defaults]?")
    bad.write_text('[profiles.big]\nmemroy = "4GiB"\n[tenants.a]\nprofile = "bgi"\n')
    _one_line_error(cli("check", str(bad), tmp_path=tmp_path), "[profiles.big]: memroy: unknown key (did you mean 'memory'?)")
    bad.write_text('[profiles.big]\nmemory = "4GiB"\n[tenants.a]\nprofile = "bgi"\n')
    _one_line_error(cli("check", str(bad), tmp_path=tmp_path), "profile: no such profile (got 'bgi'; did you mean 'big'?)")


def test_profiles_show_durations_and_unlimited_as_people_write_them(tmp_path):
    limits = tmp_path / "limits.toml"
    limits.write_text('[defaults]\ncpu_time = "90s"\nwall_time = "4h"\n[profiles.quick]\ncpu_time = "250ms"\n')
    out = cli("profiles", "--limits-file", str(limits), tmp_path=tmp_path).stdout
    assert "1m30s" in out and "4h" in out and "250ms" in out and "unlimited" in out and "[defaults]" in out


@pytest.mark.parametrize("seconds,shown", [
    (0, "0s"), (0.25, "250ms"), (0.0123, "12.3ms"), (1, "1s"), (1.5, "1.5s"), (3.456, "3.46s"), (60, "1m"),
    (90, "1m30s"), (125.44, "2m5.4s"), (3600, "1h"), (14400, "4h"), (3661, "1h1m1s"), (None, "-"),
])
def test_durations_are_written_as_people_write_them_and_read_back(seconds, shown):
    assert duration(seconds) == shown
    if seconds:
        assert parse_duration(shown) == pytest.approx(seconds, rel=2e-3)  # three significant digits


def test_print_result_is_one_short_line():
    result = JobResult(job_id="a1b2c3", kernel="sim.py", arch="cpu", verdict="memory", reason="memory limit 1 GiB "
                       "exceeded: observed 1.2 GiB (cgroup) " + "x" * 500, stdout_tail="y" * 16384,
                       traceback="z" * 4096, usage={"wall_seconds": 92.3})
    for text in (repr(result), str(result), repr([result])):
        assert "\n" not in text and len(text) < 200, text
    assert repr(result).startswith("JobResult(job_id='a1b2c3', kernel='sim.py', verdict=memory, reason='memory limit")
    assert repr(result).endswith("wall=1m32.3s)")
    assert str(result).startswith("sim.py: memory after 1m32.3s: memory limit 1 GiB exceeded")
