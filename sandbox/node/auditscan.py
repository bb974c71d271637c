"""One pass over one audit file for sandbox.node.accounting: final records summed into groups,
and what may join records of other files (the job's earlier lines, its final records' ids).

Fast path: every line is first classified by its first bytes; a `job` record outside the window is
dropped after reading only its `job_id` and `ts` (no JSON parsing), and `started`/`submitted`/
`violation` lines are kept unparsed until their job's final record needs them. Files are
independent, so `account` scans them in parallel and joins them in order.
"""

from __future__ import annotations

import gzip
import json
import math
import multiprocessing
import os
import zlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from .accounting import FILL, Group, Report, account_job, group_key, log_files, unreadable

JOB_PREFIX = b'{"type":"job","job_id":"'
KEPT_PREFIXES = (b'{"type":"started","job_id":"', b'{"type":"submitted","job_id":"', b'{"type":"violation","job_id":"')
SKIPPED_PREFIXES = (b'{"type":"alert"', b'{"type":"service"')
VIOLATION = b'{"type":"violation"'
TS = b'"ts":'


@dataclass
class Part:
    """What one file gave: its sums; the earlier lines of jobs it has no final record for (by job
    id); and per final record, (job id, its group or None when not counted, the record itself when
    it still lacks what an earlier file may hold, the file owner's uid)."""

    report: Report
    pending: dict[str, list[bytes]] = field(default_factory=dict)
    finals: list[tuple[str, str | None, dict | None, int]] = field(default_factory=list)


class Scan:
    """Reads files into a Part, or (`join`) completes final records with earlier files' lines."""

    def __init__(self, by: str, since: float | None, until: float | None, uid: int | None) -> None:
        self.since, self.until, self.uid = since, until, uid
        self.part = Part(Report(by))

    def file(self, path: Path) -> Part:
        """Scan `path` (gzip by its name). A file that stops being readable part way (a truncated
        gzip) is a problem in the report; the lines before count."""
        report, pending, finals = self.part.report, self.part.pending, self.part.finals
        owner = path.stat().st_uid
        since, until = self.since or -math.inf, self.until or math.inf
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as lines:
            try:
                for line in lines:  # the common forms inline: this loop is the report's cost
                    if line.startswith(KEPT_PREFIXES):
                        start = line.index(b'"job_id":"') + 10
                        end = line.find(b'"', start)
                        if end > 0 and line.endswith(b"}\n") and line.find(b'{"type":"', 1) < 0:  # not glued
                            pending.setdefault(line[start:end].decode(errors="replace"), []).append(line)
                            continue
                    elif line.startswith(JOB_PREFIX):
                        job_id, ts = _fast(line)
                        if ts is not None and not since <= ts < until:
                            pending.pop(job_id, None)
                            finals.append((job_id, None, None, owner))
                            continue
                    elif line.startswith(SKIPPED_PREFIXES):
                        continue
                    self.line(line, owner)
            except (OSError, EOFError, zlib.error) as err:
                report.problems.append(f"{path}: unreadable from some point on ({err}): the rest skipped")
        return self.part

    def line(self, line: bytes, owner: int) -> None:
        """Any line the fast forms did not take."""
        report = self.part.report
        try:
            record = _parse(line)
            kind = record["type"]
        except (ValueError, TypeError, KeyError):
            report.skipped_lines += 1
            glued = line.rfind(b'{"type":"')  # a record appended after a torn line, on the same line
            if glued > 0:
                self.line(line[glued:], owner)
            return
        try:
            if kind in ("started", "submitted", "violation"):
                self.part.pending.setdefault(str(record.get("job_id")), []).append(json.dumps(record).encode())
            elif kind in ("job", "aborted"):
                job_id = str(record.get("job_id"))
                earlier = self.part.pending.pop(job_id, None)
                if not self._inside(record.get("ts")):
                    self.part.finals.append((job_id, None, None, owner))
                elif earlier is None and not record.keys() >= FILL:  # what it lacks may be in an earlier file
                    self.part.finals.append((job_id, None, record, owner))
                else:
                    self.part.finals.append((job_id, self.job(record, earlier or [], owner), None, owner))
            elif kind == "refused" and self._inside(record.get("ts")) and self._visible(record, owner):
                report.groups.setdefault(group_key(record, report.by, "refused"), Group()).refused += 1
        except (TypeError, ValueError, AttributeError):  # fields of the wrong type: not an audit record
            report.skipped_lines += 1

    def job(self, record: dict, earlier: list[bytes], owner: int) -> str | None:
        """Count a final record in the window, completed by its job's earlier lines; its group, or
        None when the reader may not see it. Raises TypeError for fields of the wrong type."""
        violations = self.fill(record, earlier)
        if not self._visible(record, owner):
            return None
        report = self.part.report
        verdict = record.get("verdict") if record["type"] == "job" else "aborted"
        key = group_key(record, report.by, verdict)
        group = report.groups.get(key) or Group()
        account_job(group, record, verdict)  # raises before adding anything for a malformed record
        report.groups[key] = group
        self.violations(group, violations)
        return key

    def fill(self, record: dict, earlier: list[bytes]) -> list[dict]:
        """Fill what `record` lacks from its job's earlier lines (the final record wins); returns
        the violation records among them."""
        violations: list[dict] = []
        wanting = bool(earlier) and not record.keys() >= FILL
        for line in earlier:
            if not (wanting or line.startswith(VIOLATION)):
                continue
            try:
                other = _parse(line)
                kind = other.get("type")
            except (ValueError, AttributeError):
                self.part.report.skipped_lines += 1
                continue
            if kind == "violation":
                violations.append(other)
                continue
            when = "submitted_at" if kind == "submitted" else "started_at" if kind == "started" else None
            if when is not None and when not in record:
                record[when] = other.get("ts")
            for name in FILL:
                if name not in record and name in other:
                    record[name] = other[name]
        return violations

    def violations(self, group: Group, violations: list[dict]) -> None:
        """Count enforced violations (not the 80/90 % warnings) by resource."""
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
            return self.uid is None or _parse(line).get("uid") == self.uid
        except (ValueError, AttributeError):
            return False


def scan_file(path: Path, by: str, since: float | None, until: float | None, uid: int | None) -> Part:
    """One file's Part (a worker process's task)."""
    return Scan(by, since, until, uid).file(path)


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


def account(path: Path, by: str, since: float | None = None, until: float | None = None,
            uid: int | None = None) -> Report:
    """The report over the log at `path` and its rotated files, grouped `by` one of KEYS, of jobs
    that ended in [since, until) (epoch seconds; None: unbounded). `uid`: see only that uid's records
    (None: all). Raises AccountingError when the log cannot be read."""
    files = []
    for file in log_files(path):
        try:
            if since is not None and file.stat().st_mtime < since:
                continue  # written to last before the window: nothing in it ended inside
            open(file, "rb").close()
        except OSError as err:
            raise unreadable(file, err) from None
        files.append(file)
    tasks = [(file, by, since, until, uid) for file in files]
    workers = min(len(files), len(os.sched_getaffinity(0)))
    joined = None
    if workers > 1:
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
                joined = _join(Scan(by, since, until, uid), pool.map(scan_file, *zip(*tasks)))
        except (OSError, BrokenProcessPool):  # no processes here (no /dev/shm, a worker killed): in this one
            joined = None
    if joined is None:
        try:
            joined = _join(Scan(by, since, until, uid), (scan_file(*task) for task in tasks))
        except OSError as err:  # a file gone or made unreadable since it was checked
            raise unreadable(Path(err.filename or path), err) from None
    report = joined.part.report
    report.files = [str(file) for file in files]
    report.unfinished = sum(1 for lines in joined.part.pending.values() if joined.visible_line(lines[0]))
    return report


def _join(joined, parts):
    """Join the files' parts, oldest first: each final record takes its job's lines left by earlier
    files (violations, what it lacked); each file's leftover lines wait for later ones."""
    pending, report = joined.part.pending, joined.part.report
    for part in parts:
        for job_id, key, record, owner in part.finals:
            earlier = pending.pop(job_id, None)
            if record is not None:
                try:
                    joined.job(record, earlier or [], owner)
                except (TypeError, ValueError, AttributeError):
                    report.skipped_lines += 1
            elif earlier and key is not None:
                joined.violations(report.groups.setdefault(key, Group()), joined.fill({}, earlier))
        report.merge(part.report)
        for job_id, lines in part.pending.items():
            pending.setdefault(job_id, []).extend(lines)
    return joined
