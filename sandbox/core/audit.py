"""Append-only audit log: one JSON line per job, per violation and per alert, each fsync'ed.

Record types: `submitted` (a job was admitted and queued: its tenant, priority, limits and what
it reserves), `started` (a job was launched), `job` (its verdict), `violation`, `alert`, and
`aborted` (a job started that will have no `job` record: its supervisor died, written by whoever
outlived it, such as its fork-server), `enforced` (its fork-server killed a job past its wall_time
backstop or cluster lease, its supervisor frozen or late: sandbox.job.backstop). A `job` record carries what accounting needs (see
sandbox.node.accounting): who (`uid`, `user`, `tenant`, `job_type`), when (`submitted_at` where a
queue knew it, `started_at`, `ts` its end) and what it held (`limits`, `reserved` where a queue
reserved it, `usage`). Files are opened per write, so a log renamed by logrotate is followed.
"""

from __future__ import annotations

import collections
import errno
import functools
import json
import os
import pwd
import threading
import time
from pathlib import Path

from .limits import Limits
from .models import JobResult, JobSpec


KEEP = 10000  # writes kept in memory while the log cannot be written


class AuditUnavailable(Exception):
    """The audit log cannot be written (a full disk, an I/O error): no new job is admitted."""


class AuditLog:
    """Thread-safe appender. Records go whole or not at all: one write() with O_APPEND, fsync'ed
    before returning; a write that fails or falls short (a full disk) is cut back off the file, so
    the next record never lands on a half line. Records that could not be written are kept in memory
    (at most KEEP, oldest dropped first and counted in `lost`) and go first with the next write that
    succeeds; `failing` is the last error until then."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._kept: collections.deque[bytes] = collections.deque(maxlen=KEEP)
        self.failing: OSError | None = None
        self.lost = 0

    def append(self, records: list[dict], sync: bool = True, keep: bool = True) -> None:
        """Append records (after those kept from failed writes) in one write(); fsync'ed unless `sync`
        is False (a record that only has to survive the process, not the machine). Raises OSError when
        they cannot be written; with `keep` they are kept for the next write."""
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        with self._lock:
            try:
                self._write(b"".join(self._kept) + data, sync)
            except OSError as err:
                self.failing = err
                if keep:
                    self.lost += len(self._kept) == KEEP
                    self._kept.append(data)
                raise
            self._kept.clear()
            self.failing = None

    def _write(self, data: bytes, sync: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            before = os.fstat(fd).st_size
            try:
                written = os.write(fd, data)
                if written < len(data):
                    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({written} of {len(data)} bytes written)")
            except OSError:
                if os.fstat(fd).st_size > before:
                    os.ftruncate(fd, before)  # not a half line for the next record to be glued onto
                raise
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def event(self, record: dict) -> None:
        """Append one free-form record (alerts, admission decisions)."""
        self.append([record])

    def submitted(self, spec: JobSpec, limits: Limits, reserved: dict, priority: int) -> None:
        """A job was admitted and queued (fsync'ed: its one trace if the machine goes down before it starts)."""
        self.append([{"type": "submitted", "job_id": spec.job_id, "tenant": spec.tenant, "ts": time.time(),
                      "kernel": spec.kernel, "job_type": spec.job_type, "priority": priority, "reserved": reserved,
                      "limits": limits.model_dump(include=ACCOUNTED_LIMITS), "labels": spec.labels, **_writer()}],
                    keep=False)  # refused instead: a job admitted unrecorded would leave no trace

    def started(self, spec: JobSpec, pid: int, launcher: str) -> None:
        """A job was launched (not fsync'ed: it must outlive the supervisor's process, which the page
        cache does; a machine crash ends every job anyway)."""
        self.append([{"type": "started", "job_id": spec.job_id, "tenant": spec.tenant, "ts": time.time(),
                      "kernel": spec.kernel, "pid": pid, "launcher": launcher, "labels": spec.labels}], sync=False)

    def record(self, result: JobResult, tenant: str | None, job_type: str | None = None,
               submitted_at: float | None = None, reserved: dict | None = None) -> None:
        """One record per violation (warnings included), then the job record. `submitted_at` (epoch
        seconds) and `reserved` (memory and gpu_memory bytes, CPU slots): from the queue that admitted
        the job, where there was one."""
        base = {"job_id": result.job_id, "tenant": tenant}
        records = [{"type": "violation", **base, "ts": v.at, "pid": v.pid, "resource": v.resource,
                    "limit": v.limit, "observed": v.observed, "action": v.action, "detected_by": v.detected_by}
                   for v in result.violations]
        records.append({"type": "job", **base, "ts": result.ended_at, "kernel": result.kernel,
                        "arch": result.arch, "verdict": result.verdict.value, "reason": result.reason,
                        "exit_code": result.exit_code, "signal": result.signal,
                        "usage": result.usage.model_dump(), "labels": result.labels,
                        "job_type": job_type, "started_at": result.started_at,
                        "limits": result.limits.model_dump(include=ACCOUNTED_LIMITS),
                        **({"submitted_at": submitted_at} if submitted_at is not None else {}),
                        **({"reserved": reserved} if reserved is not None else {}), **_writer()})
        self.append(records)


ACCOUNTED_LIMITS = {"memory", "gpu_memory", "cpu_time", "wall_time", "cpu_threads", "disk"}


@functools.cache
def _writer() -> dict:
    """uid and user name of this process: who ran a job that no service submitted (the service's
    records name the client instead, see sandbox.node.jobs.NodeAudit)."""
    uid = os.getuid()
    try:
        return {"uid": uid, "user": pwd.getpwuid(uid).pw_name}
    except KeyError:
        return {"uid": uid, "user": str(uid)}
