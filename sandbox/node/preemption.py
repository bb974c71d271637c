"""Preemption for SandboxExecutor (a mixin: the executor's queue, lock and metrics are its state).

A queued job that does not fit ends the preemptible running jobs of lower priorities that
`scheduling.victims` picks: SIGTERM, their grace, SIGKILL through the job's JobControl, verdict
`preempted` with the reason naming the job that needed the room; an alert (audit record, events,
alert command) and `taichi_sandbox_preemptions_total{tenant}` count it. A job whose tenant or job
type has `requeue` goes back to the queue when that run ends, under the same id and future (which
resolves with its last run's result). `preempt()` is the same on request (node memory pressure).
Lock rule: every method but `preemptible`, `preempt` and `_cancel_requeued` is called with the
executor's `_cv` held, and none of those does I/O (alerts only queue).
"""

from __future__ import annotations

import logging

from ..core.models import JobResult, Verdict
from .quotas import Demand
from .scheduling import Entry, Running, describe, victims

log = logging.getLogger("sandbox.node.executor")


class Preemption:
    """What SandboxExecutor does to make room, and to preempt on request."""

    def _candidates(self) -> list[Running]:
        """The running jobs that may still be preempted (call under _cv)."""
        return [Running(e, e.future.tenant, e.demand, e.priority, e.started) for e in self._running
                if e.preemptible and e.future.control.preempted is None and not e.future.control.cancelled]

    def _make_room(self, entry: Entry, candidates: list[Running]) -> bool:
        """Preempt what `scheduling.victims` picks among `candidates` for `entry`, unless its victims
        are still ending; whether room is coming for it (call under _cv). The room that other
        waiting jobs' victims will free is theirs."""
        entry.room = [victim for victim in entry.room if victim in self._running]
        if entry.room:
            return True
        if not any(c.priority < entry.priority for c in candidates):
            return False
        ending = [victim for victim in self._running if victim.future.control.preempted is not None]
        promised = [e.demand for e in self._queue if e is not entry and e.room]
        used = self._used
        for sign, demands in ((-1, [v.demand for v in ending]), (1, promised)):
            for d in demands:
                used = Demand(used.cpu + sign * d.cpu, used.memory + sign * d.memory,
                              used.gpu_memory + sign * d.gpu_memory)
        name = entry.future.tenant
        chosen = victims(entry.demand, entry.priority, used, self.capacity, self._tenant(name), name,
                         self._tenants[name], candidates)
        why = f"preempted for {describe(entry.future.spec.job_id, name, entry.priority)}, which needed its room"
        entry.room = [victim.handle for victim in chosen if self._preempt(victim.handle, why)]
        return bool(entry.room)

    def _preempt(self, entry: Entry, reason: str) -> bool:
        """End the running job of `entry` with verdict `preempted` (requeued if it says so): the
        alert, audit record and metric (call under _cv)."""
        requeue = entry.requeue and not self._shutdown
        if not entry.future.control.preempt(reason + ("; it goes back to the queue" if requeue else ""), requeue):
            return False
        spec, name = entry.future.spec, entry.future.tenant
        self.metrics.preemptions.labels(name).inc()
        self.alerts.emit("preempted", tenant=name, job_id=spec.job_id, priority=entry.priority, reason=reason,
                         requeue=requeue)
        return True

    def preemptible(self) -> list[tuple[str, str, int, int]]:
        """The running jobs that may still be preempted, as (job id, tenant, priority, bytes of memory
        reserved): the lowest priority first, then the youngest (the least work lost)."""
        with self._cv:
            chosen = sorted(self._candidates(), key=lambda r: (r.priority, -r.started))
            return [(r.handle.future.spec.job_id, r.tenant, r.priority, r.demand.memory) for r in chosen]

    def preempt(self, job_id: str, reason: str) -> bool:
        """Preempt the running job `job_id` (verdict `preempted`, `reason`; requeued if its tenant or
        job type says so): False, and nothing done, unless it runs and is preemptible."""
        with self._cv:
            for entry in self._running:
                if entry.future.spec.job_id == job_id and entry.preemptible:
                    return self._preempt(entry, reason)
        return False

    def _requeue(self, entry: Entry, result: JobResult) -> bool:
        """Put a job preempted with `requeue` back in the queue, with a new control (call under _cv)."""
        if result.verdict is not Verdict.preempted or not entry.future.control.requeue or self._shutdown:
            return False
        entry.runs += 1
        entry.future.rerun()
        self._enqueue(entry)
        return True

    def _cancel_requeued(self, entries: list[Entry]) -> None:
        """Resolve requeued jobs cancelled in the queue (verdict `cancelled`, audited); without _cv."""
        for entry in entries:
            try:
                self._resolve(entry.future, Verdict.cancelled, "cancelled while queued again after its preemption")
            except OSError as err:
                log.error("job %s: no audit record of its cancellation: %s", entry.future.spec.job_id, err)

