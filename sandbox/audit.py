"""Append-only audit log: one JSON line per job, per violation and per alert, each fsync'ed."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from .models import JobResult


class AuditLog:
    """Thread-safe appender. A line is written whole with one write() and fsync'ed before returning."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def _append(self, records: list[dict]) -> None:
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode()
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)

    def event(self, record: dict) -> None:
        """Append one free-form record (alerts, admission decisions)."""
        self._append([record])

    def record(self, result: JobResult, tenant: str | None) -> None:
        """One record per violation (warnings included), then the job record."""
        base = {"job_id": result.job_id, "tenant": tenant}
        records = [{"type": "violation", **base, "ts": v.at, "pid": v.pid, "resource": v.resource,
                    "limit": v.limit, "observed": v.observed, "action": v.action, "detected_by": v.detected_by}
                   for v in result.violations]
        records.append({"type": "job", **base, "ts": result.ended_at, "kernel": result.kernel,
                        "arch": result.arch, "verdict": result.verdict.value, "reason": result.reason,
                        "exit_code": result.exit_code, "signal": result.signal,
                        "usage": result.usage.model_dump(), "labels": result.labels})
        self._append(records)
