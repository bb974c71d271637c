"""Accounting from the audit log: per tenant, user, verdict or job type, what jobs used and held.

Reads the log and its rotated files (`audit.jsonl.1`, `audit.jsonl.2.gz`, or logrotate's
`dateext` names `audit.jsonl-20261204[.gz]`), oldest first. A job counts once, by its final record
(`job`, or `aborted` when its supervisor died), joined by job id with its `submitted`, `started`
and `violation` records, which fill what the final record lacks (old records, or a fork-server's
`aborted` one); the final record wins. `refused` requests are counted apart. A job is in the window
when it ended (its final record's `ts`) in [since, until). Lines that are not JSON objects (a torn
write, a corrupt file) are skipped and counted; a field an old record lacks is `unknown`, never an
error.

Fast path: every line is first classified by its prefix; a `job` record outside the window is
dropped after reading only its `job_id` and `ts` (no JSON parsing), and `started`/`submitted`/
`violation` lines are kept unparsed until their job's final record needs them.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

GIB_HOUR = (1 << 30) * 3600.0  # byte-seconds in a GiB·h
KEYS = ("tenant", "user", "verdict", "job_type")
ROTATED = r"(?:\.\d+|-\d{8}(?:\d{2})?(?:-\d+)?)(?:\.gz)?"
JOB_PREFIX = b'{"type":"job","job_id":"'
KEPT_PREFIXES = (b'{"type":"started","job_id":"', b'{"type":"submitted","job_id":"', b'{"type":"violation","job_id":"')
SKIPPED_PREFIXES = (b'{"type":"alert"', b'{"type":"service"')
TS = b'"ts":'
FILL = frozenset(("tenant", "uid", "user", "job_type", "started_at", "submitted_at", "reserved", "limits", "arch"))


class AccountingError(Exception):
    """An audit log that cannot be read (missing, no permission): the message says which and why."""


def log_files(path: Path) -> list[Path]:
    """The log and its rotated files, oldest first: numbered ones highest first, dated ones by date,
    the live log last. Raises AccountingError when there is none."""
    pattern = re.compile(re.escape(path.name) + ROTATED + r"\Z")
    try:
        names = [name for name in os.listdir(path.parent) if pattern.match(name)]
    except OSError as err:
        raise AccountingError(f"cannot read the audit log's directory {path.parent}: {err.strerror}") from None

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

    def totals(self) -> Group:
        total = Group()
        for group in self.groups.values():
            total.merge(group)
        return total


class _Reader:
    """One pass over the files, feeding final records to the report."""

    def __init__(self, report: Report, since: float | None, until: float | None, uid: int | None) -> None:
        self.report, self.since, self.until, self.uid = report, since, until, uid
        self.pending: dict[str, list[bytes]] = {}  # job id -> its unparsed submitted/started/violation lines

    def read(self, path: Path) -> None:
        owner = path.stat().st_uid
        if self.since is not None and path.stat().st_mtime < self.since:
            return  # written to last before the window: nothing in it ended inside
        self.report.files.append(str(path))
        opened = gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
        pending, since, until = self.pending, self.since or -math.inf, self.until or math.inf
        with opened as lines:
            try:
                for line in lines:  # the common forms inline: this loop is the report's cost
                    if line.startswith(KEPT_PREFIXES):
                        start = line.index(b'"job_id":"') + 10
                        end = line.find(b'"', start)
                        if end > 0 and line.endswith(b"}\n") and line.find(b'{"type":"', 1) < 0:  # not glued
                            pending.setdefault(line[start:end].decode(), []).append(line)
                            continue
                    elif line.startswith(JOB_PREFIX):
                        job_id, ts = _fast(line)
                        if ts is not None and not since <= ts < until:
                            pending.pop(job_id, None)
                            continue
                    elif line.startswith(SKIPPED_PREFIXES):
                        continue
                    self.line(line, owner)
            except (OSError, EOFError, zlib.error) as err:
                self.report.problems.append(f"{path}: unreadable from some point on ({err}): the rest skipped")

    def line(self, line: bytes, owner: int) -> None:
        """Any line the fast forms did not take."""
        try:
            record = _parse(line)
            kind = record["type"]
        except (ValueError, TypeError, KeyError):
            self.report.skipped_lines += 1
            glued = line.rfind(b'{"type":"')  # a record appended after a torn line, on the same line
            if glued > 0:
                self.line(line[glued:], owner)
            return
        try:
            self.record(record, kind, owner)
        except (TypeError, ValueError, AttributeError):  # fields of the wrong type: not an audit record
            self.report.skipped_lines += 1

    def record(self, record: dict, kind: str, owner: int) -> None:
        if kind in ("started", "submitted", "violation"):
            self.pending.setdefault(str(record.get("job_id")), []).append(json.dumps(record).encode())
        elif kind in ("job", "aborted"):
            earlier = self.pending.pop(str(record.get("job_id")), [])
            if self._inside(record.get("ts")):
                self.job(record, earlier, owner)
        elif kind == "refused" and self._inside(record.get("ts")) and self._visible(record, owner):
            key = _key(record, self.report.by, "refused")
            self.report.groups.setdefault(key, Group()).refused += 1

    def job(self, record: dict, earlier: list[bytes], owner: int) -> None:
        violations: list[dict] = []
        wanting = bool(earlier) and not record.keys() >= FILL
        for line in earlier:
            if not (wanting or line.startswith(b'{"type":"violation"')):
                continue
            try:
                other = _parse(line)
            except (ValueError, AttributeError):
                self.report.skipped_lines += 1
                continue
            if other.get("type") == "violation":
                violations.append(other)
            else:
                if other.get("type") == "submitted" and "submitted_at" not in record:
                    record["submitted_at"] = other.get("ts")
                for name in FILL:
                    if name not in record and name in other:
                        record[name] = other[name]
        if not self._visible(record, owner):
            return
        verdict = record.get("verdict") if record["type"] == "job" else "aborted"
        key = _key(record, self.report.by, verdict)
        group = self.report.groups.get(key) or Group()
        account_job(group, record, verdict)  # raises before adding anything for a malformed record
        self.report.groups[key] = group
        for v in violations:
            if v.get("action") != "warn":
                resource = str(v.get("resource"))
                group.violations[resource] = group.violations.get(resource, 0) + 1

    def _inside(self, ts) -> bool:
        if not isinstance(ts, (int, float)):
            return self.since is None and self.until is None  # no time: only an unbounded report counts it
        return (self.since is None or ts >= self.since) and (self.until is None or ts < self.until)

    def _visible(self, record: dict, owner: int) -> bool:
        """Whether the reader may see the record: root all; others their own uid's (a record without
        a uid is the log owner's)."""
        return self.uid is None or record.get("uid", owner) == self.uid

    def visible_line(self, line: bytes) -> bool:
        """`_visible` for an unparsed line (one without a uid: only root sees it)."""
        try:
            return self.uid is None or json.loads(line).get("uid") == self.uid
        except (ValueError, AttributeError):
            return False


_scan = json.JSONDecoder().scan_once


def _parse(line: bytes):
    """json.loads for one whole line, without its per-call overhead (ValueError when it is not one
    JSON value)."""
    text = line.decode()
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(text) and text[end:].strip():
        raise ValueError("extra data")
    return value


def _fast(line: bytes) -> tuple[str | None, float | None]:
    """A `job` line's job id and top-level `ts` without parsing it (None where the form differs)."""
    start = len(JOB_PREFIX)
    end = line.find(b'"', start)
    at = line.find(TS, end)
    if end < 0 or at < 0:
        return None, None
    stop = line.find(b",", at)
    try:
        return line[start:end].decode(), float(line[at + len(TS):stop])
    except ValueError:
        return None, None


def _key(record: dict, by: str, verdict) -> str:
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


def account(path: Path, by: str, since: float | None = None, until: float | None = None,
            uid: int | None = None) -> Report:
    """The report over the log at `path` and its rotated files, grouped `by` one of KEYS, of jobs
    that ended in [since, until) (epoch seconds; None: unbounded). `uid`: see only that uid's records
    (None: all). Raises AccountingError when the log cannot be read."""
    report = Report(by)
    reader = _Reader(report, since, until, uid)
    for file in log_files(path):
        try:
            reader.read(file)
        except PermissionError:
            raise AccountingError(f"cannot read the audit log {file}: permission denied (it is root's: run the "
                                  "report as root, or ask the node's operator)") from None
        except OSError as err:
            raise AccountingError(f"cannot read the audit log {file}: {err.strerror or err}") from None
    report.unfinished = sum(1 for lines in reader.pending.values() if reader.visible_line(lines[0]))
    return report
