"""Verdicts in the user's terms: one numpy allocation larger than the memory limit, refused by the
RLIMIT_AS that `address_space = "auto"` derives from it, is a `memory` verdict whose reason says what
refused how much; `address_space` only where it was set explicitly. As root and as a real
unprivileged uid (polled limits). No breach message shows an observed value below its limit."""

from __future__ import annotations

import json

import pytest

from sandbox import JobSpec, Limits, Verdict
from sandbox.core.models import Violation
from sandbox.watch.verdict import _breach_reason

from .test_enforced import cli_as_operator, needs_root

ONE_PIECE = """
import numpy as np
import taichi as ti
ti.init(arch=ti.cpu)
grid = np.ones((2500 << 20) // 8)  # 2.44 GiB at once: past RLIMIT_AS = 2 GiB floor + 300 MiB
print(grid.sum())
"""
MiB = 1 << 20


def one_piece(directory) -> str:
    path = directory / "one_piece.py"
    path.write_text(ONE_PIECE)
    path.chmod(0o644)
    return str(path)


def observed_in(reason: str) -> float | None:
    """The MiB figure after 'observed ' in a reason, if any."""
    return float(reason.split("observed ")[1].split()[0]) if "observed " in reason else None


def test_an_allocation_refused_by_the_address_space_the_memory_limit_implies_is_memory(supervisor, tmp_path):
    result = supervisor.run(JobSpec(kernel=one_piece(tmp_path), limits=Limits(memory="300MiB")))
    assert result.verdict is Verdict.memory, result.reason
    assert result.reason.startswith("memory limit 300.0 MiB: the address-space limit it implies (RLIMIT_AS 2348.0 MiB")
    assert "refused an allocation of 2.44 GiB" in result.reason and "(MemoryError)" in result.reason
    assert observed_in(result.reason) is None
    [v] = [v for v in result.violations if v.action != "warn"]
    assert v.resource == "memory" and v.limit == 300 * MiB and v.observed >= 2348 * MiB and v.detected_by == "rlimit"


def test_an_explicit_address_space_keeps_its_own_verdict(supervisor, tmp_path):
    result = supervisor.run(JobSpec(kernel=one_piece(tmp_path), limits=Limits(memory="300MiB",
                                                                             address_space="3000MiB")))
    assert result.verdict is Verdict.address_space, result.reason
    assert result.reason.startswith("address_space limit 3000.0 MiB (RLIMIT_AS) refused an allocation of 2.44 GiB")
    [v] = [v for v in result.violations if v.action != "warn"]
    assert v.limit == 3000 * MiB and v.observed > v.limit


@needs_root
def test_as_an_unprivileged_user_too(tmp_path):
    home = tmp_path / "operator"
    home.mkdir()
    p = cli_as_operator(tmp_path, "run", one_piece(home), "--memory", "300MiB", "--json")
    result = json.loads(p.stdout)
    assert result["verdict"] == "memory", (result["reason"], p.stderr[-2000:])
    assert "refused an allocation of 2.44 GiB" in result["reason"] and "observed" not in result["reason"]


@pytest.mark.parametrize("observed", [1576 * MiB, 2348 * MiB, 3000 * MiB])
def test_no_breach_message_shows_an_observed_value_below_its_limit(observed):
    reason = _breach_reason(Violation(at=0, pid=1, resource="address_space", limit=2348 * MiB, observed=observed,
                                      action="none", detected_by="rlimit"))
    assert observed_in(reason) is None or observed_in(reason) * MiB >= 2348 * MiB, reason
