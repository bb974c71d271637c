"""The node service's restart reconciliation: the service jobs a killed or crashed service left
unfinished (queued or running), found in the audit log at its next start and recorded as `aborted`."""

from __future__ import annotations

import json
import os
import time

from ..core.audit import AuditLog

SERVICE_STARTED = b'{"type":"service","event":"started"'
TAIL_CHUNK = 1 << 20
FINAL = ("job", "aborted")  # a job's last record


def reconcile(audit: AuditLog) -> list[dict]:
    """At the service's start: append an `aborted` record for every service job (one with a
    `client_pid`) that the audit log shows submitted or started but never finished since the previous
    start (the service was killed or crashed while it was queued or ran), then a `service started`
    record; returns the aborted ones. Reads only what follows the previous `service started` record: earlier jobs were
    reconciled by that start. Jobs of other supervisors sharing the log (no `client_pid`) are theirs."""
    unfinished: dict[str, dict] = {}  # job id -> what its `submitted` and `started` records say
    try:
        with open(audit.path, "rb") as f:
            f.seek(_last_start(f))
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                kind, job_id = record.get("type"), record.get("job_id")
                if kind in ("submitted", "started") and "client_pid" in record:
                    known = unfinished.setdefault(job_id, {})
                    known.update({k: v for k, v in record.items() if k not in ("type", "ts")})
                    known[f"{kind}_at"] = record.get("ts")
                elif kind in FINAL:
                    unfinished.pop(job_id, None)
    except FileNotFoundError:
        pass
    aborted = [{**record, "type": "aborted", "ts": time.time(),
                "reason": f"the node service ended (killed or crashed) while the job {_how(record)}; found at its "
                          "restart"}
               for record in unfinished.values()]
    audit.append([*aborted, {"type": "service", "event": "started", "ts": time.time(), "pid": os.getpid()}])
    return aborted


def _how(record: dict) -> str:
    return "ran" if "started_at" in record else "was queued"


def _last_start(f) -> int:
    """The offset of the last `service started` record in the open log `f` (0 without one), found by
    reading backwards from its end."""
    end = f.seek(0, os.SEEK_END)
    tail = b""
    while end > 0:
        begin = max(0, end - TAIL_CHUNK)
        f.seek(begin)
        tail = f.read(end - begin) + tail[:len(SERVICE_STARTED)]  # a marker across the chunks' border
        found = tail.rfind(b"\n" + SERVICE_STARTED)
        if found >= 0:
            return begin + found + 1
        if begin == 0 and tail.startswith(SERVICE_STARTED):
            return 0
        end = begin
    return 0
