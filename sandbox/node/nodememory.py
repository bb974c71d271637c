"""The executor's side of the node's real memory (a mixin of SandboxExecutor; sandbox.node.pressure
reads it). Admission: a job that fits the reservations still waits while the node's available
memory does not cover it plus `[node] memory_headroom`, or PSI is past `memory_pressure_wait`.
Eviction: past `[node] evict_available` / `evict_pressure`, preemptible running jobs are ended,
lowest priority first, one at a time, with verdict `preempted` and the evidence as the reason
("node memory pressure: ..."), before the kernel's OOM killer has to choose.
"""

from __future__ import annotations

import logging

from .pressure import Probe, Reading, admission_wait, eviction_due
from .scheduling import Entry

log = logging.getLogger("sandbox.node.executor")


class NodeMemory:
    """Real-memory admission and eviction for SandboxExecutor (its `_cv`, queue and policy)."""

    def _node_probe(self) -> Probe | None:
        """Hook: what reads the memory of the node the jobs run on (this one, with the supervisor's job
        cgroups); None where they run elsewhere (see RayExecutor)."""
        return Probe(self.supervisor.cgroups.parents.get("memory"))

    def _memory_allows(self, entry: Entry) -> bool:
        """Whether the node's real memory lets `entry` start now; if not, its future says why (call
        under _cv). A job without a memory limit (it reserves the whole node) asks only for the headroom."""
        need = entry.demand.memory if entry.demand.memory < self.capacity.memory else None
        entry.future.waiting = admission_wait(self.pressure, need, self._used.memory, self.policy.node)
        return entry.future.waiting is None

    def _read_pressure(self, reading: Reading) -> bool:
        """The watch's callback: keep the reading, wake the workers when jobs wait, and past the
        eviction threshold preempt the lowest-priority preemptible running job (the youngest among
        equals; one at a time: none while a preempted job is still ending); False (no more readings)
        once shut down with nothing left to run. Never blocks: preempting only signals."""
        if reading.psi_some10 is not None:
            self.metrics.memory_pressure.set(reading.psi_some10)
        with self._cv:
            self.pressure = reading
            if self._queue:
                self._cv.notify_all()
            ending = any(e.future.control.preempted is not None for e in self._running)
            more = not (self._shutdown and not self._queue and not self._running)
        due = None if ending else eviction_due(reading, self.policy.node)
        for job_id, tenant, priority, _ in self.preemptible()[:1] if due is not None else []:
            if self.preempt(job_id, due):
                log.warning("job %s (tenant %s, priority %d) preempted: %s", job_id, tenant, priority, due)
        return more
