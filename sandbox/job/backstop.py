"""The fork-server's own deadlines per job: the wall_time backstop and the cluster lease.

The supervisor ends a job at its wall_time and at the end of its lease itself (sandbox.watch.monitor).
These are for when it cannot: its process frozen (a node SIGSTOPped, a partition) while the
fork-server, a process of its own, runs on.
- backstop: the job's fork + `ChildPlan.backstop` seconds, which the supervisor sets to wall_time +
  grace + BACKSTOP_SLACK (a job without wall_time has none);
- lease: an absolute deadline, the plan's `lease` at the fork, then set, extended or cleared by lease
  messages (see sandbox.job.forkserver) naming the job by id and pid; the supervisor hands it the
  lease's end + grace + BACKSTOP_SLACK, having to end the job itself, gracefully, at the lease's end.
Clock: CLOCK_MONOTONIC (`time.monotonic`), one clock for every process of a node, so a deadline the
supervisor computed is absolute here too. Past either deadline the fork-server kills exactly that job
(`kill_job`) and says why (`DUE_LINE`, then the usual exit line).
"""

from __future__ import annotations

import json
import math
import os
import signal
from dataclasses import dataclass

# Seconds the supervisor has beyond wall_time + grace, or a lease's end + grace, to end the job itself
# (a monitor tick, the SIGKILL of a whole tree on a loaded node) before its fork-server does.
BACKSTOP_SLACK = 5.0
KINDS = ("wall_time", "lease")
DUE_LINE = "killed {kind} {after:.3f}\n"  # on the job's reply socket: what, seconds after its fork


def _deadline(value: object) -> float | None:
    """A finite number of seconds, or None; anything else raises ValueError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"not a deadline: {value!r}")
    return float(value)


@dataclass
class _Job:
    job_id: str
    forked: float
    backstop: float | None
    lease: float | None


class Deadlines:
    """The deadlines of the fork-server's running jobs, by the pid of each one's first process."""

    def __init__(self) -> None:
        self._jobs: dict[int, _Job] = {}

    def add(self, pid: int, plan: dict, forked: float) -> None:
        """A job just forked at `forked` from `plan` (its ChildPlan as JSON: `job_id`, `backstop`, `lease`)."""
        backstop = _deadline(plan.get("backstop"))
        self._jobs[pid] = _Job(str(plan["job_id"]), forked, None if backstop is None else forked + backstop,
                               _deadline(plan.get("lease")))

    def lease(self, payload: bytes) -> bool:
        """Apply a lease message, {"job_id", "pid", "deadline": seconds or null}; whether it named a
        running job here. Malformed, or for a job that ended (or is not at that pid): ignored."""
        try:
            message = json.loads(payload)
            job = self._jobs.get(message["pid"]) if type(message["pid"]) is int else None
            if job is None or job.job_id != message["job_id"]:
                return False
            job.lease = _deadline(message["deadline"])
        except (ValueError, TypeError, KeyError):
            return False
        return True

    def forget(self, pid: int) -> None:
        """The job ended (reaped)."""
        self._jobs.pop(pid, None)

    def timeout(self, now: float) -> float | None:
        """Seconds until the next deadline (0 when one passed), None when there is none."""
        times = [t for job in self._jobs.values() for t in (job.backstop, job.lease) if t is not None]
        return max(0.0, min(times) - now) if times else None

    def due(self, now: float) -> list[tuple[int, str, str, float]]:
        """(pid, job id, "wall_time" or "lease", seconds since its fork) for each job whose deadline
        passed; those jobs have no deadline any more (each is killed once)."""
        found = []
        for pid, job in list(self._jobs.items()):
            kind = "wall_time" if job.backstop is not None and now >= job.backstop else \
                "lease" if job.lease is not None and now >= job.lease else None
            if kind is not None:
                found.append((pid, job.job_id, kind, now - job.forked))
                del self._jobs[pid]
        return found


def kill_job(pid: int) -> None:
    """SIGKILL the job whose first process is `pid`, our unreaped child: its process group and every
    descendant, each stopped first (a stopped process cannot fork out of reach). The job is a subreaper,
    so its orphans stay its descendants; an isolated job's first process is the init of its PID
    namespace (or the relay above it), whose death kills the namespace. Never waits: the exit is
    reaped, and reported, as any other."""
    import psutil  # preloaded by the fork-server

    from .stopping import stop_all

    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    def tree() -> list[psutil.Process]:
        try:
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return [root]
    stopped = stop_all(tree)
    try:
        os.killpg(pid, signal.SIGKILL)  # the group the job made (it calls setsid); none yet: ESRCH
    except OSError:
        pass
    for proc in [root, *stopped]:
        try:
            proc.kill()
        except psutil.Error:
            pass
