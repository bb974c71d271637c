"""`@pytest.mark.sandbox(...)`: its keywords are Limits fields (values as in limits.toml:
"1GiB", "10s", "unlimited"), plus `arch`, `profile`, `tenant` and `env` (the job's extra
environment). Checked when tests are collected: a mistake is a one-line usage error."""

from __future__ import annotations

import difflib
from typing import Any

import pytest

from ..core.limits import ConfigError, Limits

SPEC_KEYS = ("arch", "profile", "tenant", "env")


def job_options(marker: pytest.Mark) -> tuple[dict[str, Any], dict[str, Any]]:
    """(limits, other JobSpec fields) of a marker that `problem()` accepted."""
    spec = {k: v for k, v in marker.kwargs.items() if k in SPEC_KEYS}
    return {k: v for k, v in marker.kwargs.items() if k not in SPEC_KEYS}, spec


def problem(marker: pytest.Mark) -> str | None:
    """What is wrong with the marker's arguments (one line), or None."""
    if marker.args:
        return "@pytest.mark.sandbox takes keywords only (limits, arch, profile, tenant, env)"
    valid = [*Limits.model_fields, *SPEC_KEYS]
    for key in marker.kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid: {', '.join(valid)}"
            return f"@pytest.mark.sandbox: unknown keyword {key!r} ({hint})"
    limits, spec = job_options(marker)
    env = spec.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        return "@pytest.mark.sandbox: env= takes a dict of str to str"
    try:
        Limits(**limits)
    except ConfigError as err:
        return f"@pytest.mark.sandbox: {err}"
    return None
