"""Limits, units and limits.toml: parsing, inheritance, overrides, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from sandbox import ConfigError, Limits, Policy
from sandbox.core.limits import GiB, MiB, address_space_for
from sandbox.core.units import parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("text,expected", [
    ("2GiB", 2 * GiB), ("512MiB", 512 * MiB), ("1.5G", int(1.5 * GiB)), ("1000", 1000), (4096, 4096),
    ("10MB", 10_000_000), ("unlimited", None),
])
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("1.5s", 1.5), ("250ms", 0.25), ("2m", 120.0), (3, 3.0), ("0.5", 0.5), ("1h", 3600.0),
])
def test_durations(text, expected):
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("field,value,fragment", [
    ("cpu_time", "-1s", "cpu_time: must be a finite number >= 0 (got '-1s')"),
    ("cpu_time", -3, "(got -3)"),
    ("memory", "2 parsecs", "memory: expected a number with a unit"),
    ("wall_time", "0s", "must be greater than zero"),
    ("max_processes", 2.5, "expected a whole number"),
    ("gpu_memory", "150%", "percentage"),
    ("poll_interval", "fast", "(got 'fast')"),
])
def test_bad_values_are_one_line_errors_naming_field_and_value(field, value, fragment):
    with pytest.raises(ConfigError) as info:
        Limits(**{field: value})
    message = str(info.value)
    assert "\n" not in message and field in message and fragment in message


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match=r"cpu_tiem: unknown key \(did you mean 'cpu_time'\?\)"):
        Limits(cpu_tiem="1s")


def test_gpu_memory_forms():
    assert Limits(gpu_memory="50%").gpu_memory == 0.5
    assert Limits(gpu_memory=0.25).gpu_memory == 0.25
    assert Limits(gpu_memory="2GiB").gpu_memory == 2 * GiB


def test_merge_keeps_only_explicit_overrides():
    base = Limits(cpu_time="10s", memory="1GiB")
    merged = base.merged(Limits(memory="2GiB"))
    assert merged.cpu_time == 10 and merged.memory == 2 * GiB
    assert merged.model_fields_set == {"cpu_time", "memory"}


def test_bundled_limits_toml_is_valid_and_profiles_inherit_defaults():
    policy = Policy.load(ROOT / "limits.toml")
    assert set(policy.profiles) >= {"test", "training", "gpu"}
    test = policy.resolve("test")
    assert test.cpu_time == 10 and test.max_open_files == policy.defaults.max_open_files
    assert policy.resolve(tenant="default") == test


def test_overrides_beat_profile(tmp_path):
    policy = Policy.load(ROOT / "limits.toml")
    limits = policy.resolve("test", overrides=Limits(cpu_time="2s"))
    assert limits.cpu_time == 2 and limits.memory == GiB


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "limits.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,fragment", [
    ("[defaults]\ncpu_time = \"-5s\"\n", "[defaults]: cpu_time: must be a finite number >= 0 (got '-5s')"),
    ("[defaults]\ncpu_tme = 5\n", "[defaults]: cpu_tme: unknown key (did you mean 'cpu_time'?)"),
    ("[profiles.x]\nmemory = \"lots\"\n", "[profiles.x]: memory: expected a number with a unit"),
    ("[defaults\ncpu_time = 5\n", "invalid limits file"),
    ("[limits]\ncpu_time = 5\n", "unknown table [limits]"),
    ("[tenants.a]\nprofile = \"missing\"\n", "[tenants.a]: profile: no such profile (got 'missing'; known: none defined)"),
    ("[sandbox]\nlauncher = \"fork\"\n", "[sandbox]: launcher: Input should be 'forkserver' or 'exec' (got 'fork')"),
    ("profiles = 3\n", "profiles"),
])
def test_malformed_limits_toml_one_line_error_with_file_and_key(tmp_path, text, fragment):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        Policy.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and fragment in message


def test_missing_limits_file():
    with pytest.raises(ConfigError, match="limits file not found"):
        Policy.load("/nonexistent/limits.toml")


def test_address_space_is_taichi_aware():
    assert address_space_for(Limits(memory="1GiB"), "cpu")[0] == 3 * GiB
    assert address_space_for(Limits(), "cuda")[0] is None
    value, note = address_space_for(Limits(address_space="1GiB"), "cpu")
    assert value == GiB and "below the Taichi cpu floor" in note
    assert address_space_for(Limits(address_space="unlimited"), "cpu")[0] is None


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list(Limits.model_fields) + ["bogus"]),
                       st.one_of(st.text(max_size=12), st.integers(-10, 10**12), st.floats(allow_nan=True),
                                 st.booleans(), st.none()), max_size=4))
def test_fuzzed_limits_either_parse_or_fail_with_one_line(data):
    try:
        Limits.parse(data, "fuzz")
    except ConfigError as err:
        assert "\n" not in str(err) and str(err).startswith("fuzz: ")


def test_shared_node_example_is_valid():
    policy = Policy.load(ROOT / "examples" / "shared-node.toml")
    assert set(policy.tenants) == {"physics", "ml", "ci"}
    assert policy.resolve(tenant="ml").memory == 48 * GiB
    assert policy.resolve(tenant="ml", job_type="training").cpu_time == 12 * 3600
    assert policy.resolve(tenant="ci", job_type="test").cpu_time == 60
    with pytest.raises(ConfigError, match=r"tenant 'ci' may lower .* cpu_time 12h > 1m"):
        policy.resolve(tenant="ci", job_type="training")  # a job type is no way past a tenant's profile
    assert policy.tenants["ci"].gpu_memory_quota == 0 and policy.tenants["physics"].rate == 0.5
