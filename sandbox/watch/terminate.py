"""Ending a job's processes: signal them all, and kill them all with no way out.

With a job cgroup, membership is the kernel's and the kill is atomic (cgroup.kill, or freeze →
SIGKILL → thaw). Without one (the polled fallback) every process found is stopped with SIGSTOP
until a fresh scan finds no new one (a stopped process cannot fork, so a daemon that keeps changing
its pid cannot outrun the scan), then all of them are SIGKILLed.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

import psutil

from ..core.models import Termination, Violation
from ..job.cgroup import JobCgroup
from ..job.stopping import stop_all
from .tree import JobTree

def stop_then_kill(find: Callable[[], list[psutil.Process]]) -> list[int]:
    """SIGSTOP whatever `find()` returns until it returns nothing new, then SIGKILL all of it;
    returns the pids once they are gone (waits a second at most)."""
    stopped = stop_all(find)
    for proc in stopped:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(stopped, timeout=1.0)
    return sorted(p.pid for p in stopped)


class JobProcesses:
    """The processes of one running job, from its cgroup when it has one, else from the polled tree
    (`pgid`: the job's process group, signalled too while its main process lives)."""

    def __init__(self, tree: JobTree, pgid: int, cgroup: JobCgroup | None) -> None:
        self.tree, self.pgid, self.cgroup = tree, pgid, cgroup
        self.outside_cgroup: list[int] = []  # killed job processes that had left the cgroup (root can)

    def alive(self) -> bool:
        """Whether a process of the job lives: in its cgroup, or, until it has joined it (the job
        joins it itself, just after its launch), in its tree."""
        return (self.cgroup is not None and bool(self.cgroup.pids())) or bool(self.tree.alive())

    def signal(self, sig: int) -> list[int]:
        """Send `sig` to every process of the job (not atomic: for SIGTERM): those in its cgroup, or
        its tree's when the cgroup has none yet (a job cancelled or preempted as it starts)."""
        if self.cgroup is not None:
            hit = self.cgroup.signal(sig)
            if hit:
                return hit
        try:
            os.killpg(self.pgid, sig)
        except OSError:
            pass
        hit = []
        for proc in self.tree.alive():
            try:
                proc.send_signal(sig)
                hit.append(proc.pid)
            except psutil.Error:
                pass
        return hit

    def kill(self, also: Callable[[], list[psutil.Process]] | None = None) -> list[int]:
        """SIGKILL the whole job with no way out; `also` finds processes the tree cannot (orphans
        the launcher reaped). The cgroup goes first (atomic); what the tree or `also` still finds
        then is outside it. Returns the pids killed, once they are gone."""
        in_cgroup = self.cgroup.kill() if self.cgroup is not None else []
        rest = stop_then_kill(lambda: self.tree.alive(fresh=True) + (also() if also is not None else []))
        if self.cgroup is not None:
            self.outside_cgroup += rest
        return sorted(set(in_cgroup) | set(rest))


def end_job(job, violation: Violation | None, requested: Callable[[], Termination] | None = None) -> None:
    """SIGTERM the whole job (the supervisor's `_Job`), wait its grace, then kill what is left
    (or kill at once for a `sigkill` violation). `violation` None means the job was ended on request:
    `requested()` says how to record it (default: cancelled)."""
    with job.lock:
        if violation is not None:
            job.violations.append(violation)
            job.termination = Termination(reason=violation.resource)
        else:
            job.termination = requested() if requested is not None else Termination(reason="cancelled")
    term = job.termination
    if violation is None or violation.action != "sigkill":
        term.terminated_pids = job.procs.signal(signal.SIGTERM)
        term.sigterm_at = time.time()
        deadline = time.monotonic() + job.limits.grace
        while time.monotonic() < deadline and job.procs.alive():
            time.sleep(min(0.01, max(deadline - time.monotonic(), 0)))
        if not job.procs.alive():
            return
    term.sigkill_at = time.time()
    term.killed_pids = job.procs.kill()
