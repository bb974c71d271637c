"""Accounting from the audit log: per tenant, user, verdict or job type, what jobs used and held.

Reads the log and its rotated files (`audit.jsonl.1`, `audit.jsonl.2.gz`, or logrotate's
`dateext` names `audit.jsonl-20261204[.gz]`), oldest first. A job counts once, by its final record
(`job`, or `aborted` when its supervisor died), joined by job id with its `submitted`, `started`
and `violation` records, which fill what the final record lacks (old records, or a fork-server's
`aborted` one); the final record wins. `refused` requests are counted apart. A job is in the window
when it ended (its final record's `ts`) in [since, until). Lines that are not JSON objects (a torn
write, a corrupt file) are skipped and counted; a field an old record lacks is `unknown`, never an
error.

Files are scanned in parallel (sandbox.node.auditscan, a process per file up to the CPUs this
process may use) and joined oldest first.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

GIB_HOUR = (1 << 30) * 3600.0  # byte-seconds in a GiB·h
KEYS = ("tenant", "user", "verdict", "job_type")
ROTATED = r"(?:\.\d+|-\d{8}(?:\d{2})?(?:-\d+)?)(?:\.gz)?"
FILL = frozenset(("tenant", "uid", "user", "job_type", "started_at", "submitted_at", "reserved", "limits", "arch"))


class AccountingError(Exception):
    """An audit log that cannot be read (missing, no permission): the message says which and why."""


def log_files(path: Path) -> list[Path]:
    """The log and its rotated files, oldest first: numbered ones highest first, dated ones by date,
    the live log last. Raises AccountingError when there is none."""
    pattern = re.compile(re.escape(path.name) + ROTATED + r"\Z")
    try:
        names = [name for name in os.listdir(path.parent) if pattern.match(name)]
    except FileNotFoundError:
        names = []
    except OSError as err:  # its directory is root's
        raise unreadable(path, err) from None

    def age(name: str) -> tuple:
        suffix = name[len(path.name):].removesuffix(".gz")
        return (0, -int(suffix[1:])) if suffix.startswith(".") else (1, suffix)
    files = [path.parent / name for name in sorted(names, key=age)]
    if path.exists():
        files.append(path)
    if not files:
        raise AccountingError(f"no audit log at {path} (nor rotated files beside it)")
    return files


@dataclass
class Group:
    """One group's sums. A value that some jobs lack is summed over the others, and `unknown`
    counts the jobs that lacked it; one that every job lacked is None."""

    jobs: int = 0
    refused: int = 0
    preemptions: int = 0
    cpu_seconds: float | None = None
    wall_seconds: float | None = None
    reserved_memory_gib_hours: float | None = None
    gpu_memory_gib_hours: float | None = None
    peak_memory: int | None = None
    violations: dict[str, int] = field(default_factory=dict)
    waits: list[float] = field(default_factory=list)
    unknown: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: float | None) -> None:
        if value is None:
            self.unknown[name] = self.unknown.get(name, 0) + 1
        else:
            setattr(self, name, (getattr(self, name) or 0) + value)

    def merge(self, other: "Group") -> None:
        for name in ("jobs", "refused", "preemptions"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("cpu_seconds", "wall_seconds", "reserved_memory_gib_hours", "gpu_memory_gib_hours"):
            if getattr(other, name) is not None:
                setattr(self, name, (getattr(self, name) or 0) + getattr(other, name))
        if other.peak_memory is not None:
            self.peak_memory = max(self.peak_memory or 0, other.peak_memory)
        for target, source in ((self.violations, other.violations), (self.unknown, other.unknown)):
            for name, count in source.items():
                target[name] = target.get(name, 0) + count
        self.waits.extend(other.waits)

    def as_dict(self) -> dict:
        waits = sorted(self.waits)
        return {"jobs": self.jobs, "refused": self.refused, "preemptions": self.preemptions,
                "cpu_seconds": self.cpu_seconds, "wall_seconds": self.wall_seconds,
                "reserved_memory_gib_hours": self.reserved_memory_gib_hours,
                "gpu_memory_gib_hours": self.gpu_memory_gib_hours, "peak_memory_bytes": self.peak_memory,
                "violations": dict(sorted(self.violations.items())),
                "queue_wait": {"jobs": len(waits),
                               "mean_seconds": sum(waits) / len(waits) if waits else None,
                               "p95_seconds": waits[max(0, math.ceil(0.95 * len(waits)) - 1)] if waits else None},
                "unknown": dict(sorted(self.unknown.items()))}


@dataclass
class Report:
    """What `account` found: the groups, lines skipped, jobs without a final record."""

    by: str
    groups: dict[str, Group] = field(default_factory=dict)
    skipped_lines: int = 0
    unfinished: int = 0
    files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def merge(self, other: "Report") -> None:
        for key, group in other.groups.items():
            self.groups.setdefault(key, Group()).merge(group)
        self.skipped_lines += other.skipped_lines
        self.problems += other.problems

    def totals(self) -> Group:
        total = Group()
        for group in self.groups.values():
            total.merge(group)
        return total


def group_key(record: dict, by: str, verdict) -> str:
    """The record's group: its field `by`; `unknown` where an old record lacks it. No tenant is
    the default tenant; no job type, `-`."""
    if by == "verdict":
        return str(verdict) if verdict is not None else "unknown"
    if by not in record and not (by == "user" and "uid" in record):
        return "unknown"
    value = record.get(by)
    if by == "user" and value is None:
        value = record.get("uid")
    if value is None:
        return {"tenant": "_default", "job_type": "-"}.get(by, "unknown")
    return str(value)


def account_job(group: Group, record: dict, verdict) -> None:
    """Add one job's final record (joined with its earlier ones) to `group`: computed first, then
    added, so a record with a field of the wrong type (TypeError) adds nothing."""
    usage = record.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    wall = usage.get("wall_seconds")
    started, ended, submitted = record.get("started_at"), record.get("ts"), record.get("submitted_at")
    held = ended - started if started is not None and ended is not None else wall
    reserved, limits = record.get("reserved") or {}, record.get("limits") or {}
    memory = reserved.get("memory", limits.get("memory"))
    gpu = reserved.get("gpu_memory", limits.get("gpu_memory"))
    if not isinstance(gpu, int) and record.get("arch") == "cpu" and limits:
        gpu = 0  # a CPU job holds no device memory (a fraction, or none, of a device it does not use)
    if verdict == "rejected" or held == 0:
        memory = gpu = 0  # it never ran: it held nothing
    values = (("cpu_seconds", usage.get("cpu_seconds") + 0 if "cpu_seconds" in usage else None),
              ("wall_seconds", wall + 0 if wall is not None else None),
              ("reserved_memory_gib_hours", None if memory is None or held is None else memory * held / GIB_HOUR),
              ("gpu_memory_gib_hours", gpu * held / GIB_HOUR if isinstance(gpu, int) and held is not None else None))
    peak = usage.get("peak_memory")
    if peak is None:
        peak = usage.get("peak_rss")
    wait = max(0.0, started - submitted) if submitted is not None and started is not None else None
    if peak is not None:
        peak = max(peak, group.peak_memory or 0)
    for name, value in values:
        group.add(name, value)
    if peak is None:
        group.unknown["peak_memory"] = group.unknown.get("peak_memory", 0) + 1
    else:
        group.peak_memory = peak
    if wait is not None and verdict != "rejected":
        group.waits.append(wait)
    group.jobs += 1
    if verdict == "preempted":
        group.preemptions += 1


def unreadable(file: Path, err: OSError) -> AccountingError:
    if isinstance(err, PermissionError):
        return AccountingError(f"cannot read the audit log {file}: permission denied (it is root's: run the "
                               "report as root, or ask the node's operator)")
    return AccountingError(f"cannot read the audit log {file}: {err.strerror or err}")
