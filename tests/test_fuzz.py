"""Bad input, fuzzed with hypothesis: every invalid input is one clear line naming the field; never a
traceback, never a started job."""

from __future__ import annotations

import os

import psutil
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from sandbox import ConfigError, JobSpec, Limits, Policy
from sandbox.cli import app

FIELDS = list(Limits.model_fields)
values = st.one_of(st.text(max_size=10), st.integers(-(10**15), 10**15), st.floats(allow_nan=True),
                   st.booleans(), st.none(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                                                                                                  st.integers(), max_size=2))
tables = st.dictionaries(st.sampled_from(FIELDS + ["bogus", "cpu time"]), values, max_size=4)
documents = st.dictionaries(
    st.sampled_from(["defaults", "profiles", "tenants", "sandbox", "extra"]),
    st.one_of(tables, st.dictionaries(st.text(min_size=1, max_size=6), st.one_of(tables, values), max_size=3), values),
    max_size=4)


def _one_line(err: Exception) -> None:
    assert isinstance(err, ConfigError)
    assert "\n" not in str(err) and str(err).strip()


@settings(max_examples=300, deadline=None)
@given(documents)
def test_fuzzed_policy_documents(data):
    try:
        Policy.from_dict(data, "limits.toml")
    except ConfigError as err:
        _one_line(err)
        assert str(err).startswith("limits.toml")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200))
def test_fuzzed_limits_files(tmp_path, blob):
    path = tmp_path / "limits.toml"
    path.write_bytes(blob)
    try:
        Policy.load(path)
    except ConfigError as err:
        _one_line(err)
        assert str(path) in str(err)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["kernel", "arch", "args", "kwargs", "argv", "env", "labels", "profile",
                                        "tenant", "nope"]), values, max_size=4))
def test_fuzzed_job_specs(data):
    try:
        JobSpec(**data)
    except ConfigError as err:
        _one_line(err)


OPTIONS = ["--cpu-time", "--wall-time", "--memory", "--address-space", "--gpu-memory", "--max-output", "--grace",
           "--max-processes", "--arch", "--launcher", "--profile"]
flag_values = st.one_of(st.sampled_from(["-1s", "0", "1e999", "2 parsecs", "nan", "", "5", "1GiB", "inf", "%",
                                         "150%", "-5", "10xs", "cpu", "tpu", "exec"]),
                        st.text(alphabet="0123456789.-eEsmiGKBb% ", max_size=8))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(OPTIONS), flag_values), min_size=1, max_size=4))
def test_fuzzed_cli_flags_never_traceback_never_start(flags):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    argv = ["run", "/nonexistent/kernel.py"] + [x for pair in flags for x in pair]
    result = CliRunner().invoke(app, argv, env={"TAICHI_SANDBOX_LIMITS": ""})
    assert result.exit_code == 2, (argv, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and (lines[-1].startswith("taichi-sandbox: error: ") or "Usage:" in result.output)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_cli_rejects_before_anything_runs_even_with_a_real_kernel(tmp_path):
    kernel = os.path.join(os.path.dirname(__file__), "..", "kernels", "sleeper.py")
    result = CliRunner().invoke(app, ["run", kernel, "--memory", "-1GiB"])
    assert result.exit_code == 2 and "memory: must be a finite number >= 0 (got '-1GiB')" in result.output
