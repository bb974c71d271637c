"""Bad input, fuzzed with hypothesis: every input to a limit is either a valid Limits (that survives
JSON) or one clear line naming the field and the value; never a traceback, never a started job.
Limits arrive as keywords (Limits, run_kernel, @sandboxed, the pytest marker), as a table
(Limits.parse: the CLI, limits.toml), inside a JobSpec, in a limits.toml file, on the command line
and in a node-service request: each way is fuzzed with the same nasty values."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from sandbox import ConfigError, JobSpec, Limits, Policy, load_policy
from sandbox.cli import app
from sandbox.core.limits import Node, Service, Tenant
from sandbox.node.protocol import JobRequest, ProtocolError

FIELDS = list(Limits.model_fields)
NASTY = [-1, -0.0, 0, 1, 2.5, 4096, 10**30, 2**63, 1e300, 1e-300, math.nan, math.inf, -math.inf, True, False, None,
         [], [1], {}, {"a": 1}, "", "  ", "unlimited", "UNLIMITED", " none ", "off", "auto", "nan", "inf", "-inf",
         "1e999GiB", "1e999", "GiB", "s", "ms", "%", "/s", "\u0663", "\uff13s", "\u00bd", "\u221e", "1 GiB", "1GiB", "1.5",
         "0.001", "5 min", "5min", "1m30s", "1m30", "1h 30m", "250ms", "2s", "-1s", "10xs", "5GiB", "5s", "50%",
         "150%", "0%", "1e-400", "\x00", "1\n", "1_000", "0x10", "1,5", "1e9s", "1e10s", "99999999999", "1000000000TiB",
         "2/s", "host", "none\x00", "1" * 400]
nasty = st.one_of(st.sampled_from(NASTY), st.text(max_size=12), st.integers(), st.floats(),
                  st.text(alphabet="0123456789.-+eE%smhKMGTiBb /", max_size=10))
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
           "--max-processes", "--max-result", "--disk", "--arch", "--launcher", "--profile"]
flag_values = st.one_of(st.sampled_from(["-1s", "0", "1e999", "2 parsecs", "nan", "", "5", "1GiB", "inf", "%",
                                         "150%", "-5", "10xs", "cpu", "tpu", "exec"]),
                        st.sampled_from([v for v in NASTY if isinstance(v, str) and "\x00" not in v]),
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
    assert lines and (len(lines) == 1 and lines[0].startswith("taichi-sandbox: error: ") or "Usage:" in result.output)
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before


def test_cli_rejects_before_anything_runs_even_with_a_real_kernel(tmp_path):
    kernel = os.path.join(os.path.dirname(__file__), "..", "kernels", "sleeper.py")
    result = CliRunner().invoke(app, ["run", kernel, "--memory", "-1GiB"])
    assert result.exit_code == 2 and "memory: must be a finite number >= 0 (got '-1GiB')" in result.output


def _limits_or_one_line(make, field: str, value, prefix: str = "") -> Limits | None:
    """`make()`'s Limits, which must survive a JSON round trip, or None after checking its ConfigError
    is one line that starts with `prefix` and names `field` and the value."""
    try:
        made = make()
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message and message.startswith(prefix), message
        assert f"{field}: " in message, message
        assert "unknown key" in message or f"(got {repr(value)[:40]}" in message, message
        return None
    limits = made if isinstance(made, Limits) else made.limits
    assert Limits.model_validate_json(limits.model_dump_json()) == limits
    return limits


@settings(max_examples=600, deadline=None)
@given(st.sampled_from(FIELDS + ["memroy", "cpu_tme", "unlimited"]), nasty)
def test_fuzzed_limit_keywords(field, value):
    """Limits(**), and so run_kernel(limits={...}), @sandboxed(...) and @pytest.mark.sandbox(...)."""
    _limits_or_one_line(lambda: Limits(**{field: value}), field, value, "Limits: ")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FIELDS), nasty)
def test_fuzzed_limit_tables_and_job_specs(field, value):
    _limits_or_one_line(lambda: Limits.parse({field: value}, "command line"), field, value, "command line: ")
    _limits_or_one_line(lambda: JobSpec(kernel="k.py", limits={field: value}), f"limits.{field}", value, "JobSpec: ")


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(FIELDS), nasty.filter(lambda v: isinstance(v, str)))
def test_fuzzed_limits_in_service_requests(field, value):
    request = JobRequest(kernel="k.py", source="print(1)", limits={field: value})
    try:
        spec = request.spec(None, 1, Path("/nonexistent/spool"))
    except (ConfigError, ProtocolError) as err:
        assert "\n" not in str(err) and str(err).startswith(f"job 1: limits.{field}: "), str(err)
    else:
        assert Limits.model_validate_json(spec.limits.model_dump_json()) == spec.limits


def _toml(value) -> str | None:
    """`value` as a TOML value (None: TOML has no null)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):  # a basic string: TOML's escapes are JSON's, less surrogate pairs, plus DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        items = [_toml(v) for v in value]
        return "[" + ", ".join(i for i in items if i is not None) + "]"
    return "{" + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items() if v is not None) + "}"


TABLES = {"defaults": FIELDS, "profiles.p": FIELDS, "tenants.t": list(Tenant.model_fields),
          "service": list(Service.model_fields), "node": list(Node.model_fields)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(sorted(TABLES)).flatmap(lambda t: st.tuples(st.just(t), st.sampled_from(TABLES[t]))), nasty)
def test_fuzzed_limits_toml_values(tmp_path, where, value):
    table, field = where
    text = _toml(value)
    path = tmp_path / "limits.toml"
    path.write_text(f"[{table}]\n" + (f"{field} = {text}\n" if text is not None else ""))
    try:
        load_policy(path)
    except ConfigError as err:
        message = str(err)
        assert "\n" not in message and message.startswith(str(path)) and f"{field}: " in message, message


@pytest.mark.parametrize("field", [f for f in FIELDS if f != "network"])  # a choice: "none" or "host"
@pytest.mark.parametrize("word", ["unlimited", "none", "Unlimited", " none "])
def test_unlimited_is_accepted_by_every_limit_that_can_be_unlimited(field, word):
    """None is unlimited; the SIGTERM -> SIGKILL delay and the sampling interval cannot be, and
    say so in one line."""
    if field in ("grace", "poll_interval"):
        with pytest.raises(ConfigError, match=f"^Limits: {field}: .*\\(got '{word}'\\)$"):
            Limits(**{field: word})
    else:
        assert getattr(Limits(**{field: word}), field) is None
        assert getattr(Limits.parse({field: word}, "limits.toml [defaults]"), field) is None
