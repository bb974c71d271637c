"""Admission for SandboxExecutor (a mixin: the executor's queue, lock, policy and metrics are its
state): a submission's limits and demand checked against the policy, a refusal as a `rejected`
result (counted, alerted, audited), the `submitted` record written before the workers see a job,
and a policy reloaded (SIGHUP) re-checking every queued job.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future

from ..core.audit import AuditUnavailable
from ..core.limits import ConfigError, Limits, Policy, Tenant
from ..core.models import JobSpec, Verdict
from .quotas import Demand, TenantUsage, admission_problem, demand, node_capacity
from .scheduling import Entry


class Admission:
    """What SandboxExecutor decides about a job before it is queued, and again on a reload."""

    def _record_submitted(self, entry: Entry, limits: Limits) -> None:
        """Write the queued job's `submitted` record, then let the workers see it. When the record
        cannot be written the job leaves the queue and AuditUnavailable is raised (call without _cv)."""
        try:
            self.supervisor.audit.submitted(entry.future.spec, limits, dataclasses.asdict(entry.demand), entry.priority)
        except OSError as err:
            with self._cv:
                if entry in self._queue:
                    self._queue.remove(entry)
                    self._dequeued(entry)
            raise AuditUnavailable(f"the audit log cannot be written ({err.strerror or err}): no new jobs until "
                                   "it can") from None
        with self._cv:
            entry.recorded = True
            if any(e.preemptible and e.priority < entry.priority for e in self._running):
                self._pick(take=False)
            self._cv.notify_all()

    def _check(self, spec: JobSpec, name: str) -> tuple[Limits | None, Demand, tuple[str, str] | None]:
        """The job's limits and demand under the policy now, and (reason code, message) when it can
        never run here."""
        try:
            limits = self.policy.resolve(spec.profile, spec.tenant, spec.limits, spec.job_type)
        except ConfigError as err:
            return None, Demand(0, 0, 0), ("invalid", str(err))
        need = demand(spec, limits, self.capacity)
        return limits, need, admission_problem(name, need, self._tenant(name), self.capacity)

    def reload(self, policy: Policy) -> int:
        """Apply `policy` (validated by the caller) to jobs not started yet: running jobs keep what they
        reserved and the limits they started with; each queued job is checked again against the new
        ceilings, quotas and capacity, and one that can no longer run here is `rejected` with the
        reason. Returns how many were rejected."""
        capacity = self.capacity if policy.node == self.policy.node else node_capacity(policy, *self._measured)
        refused = []
        with self._cv:
            self.policy = self.supervisor.policy = policy
            self.capacity = capacity
            for entry in [e for e in self._queue if not e.future.cancelled()]:
                _, entry.demand, problem = self._check(entry.future.spec, entry.future.tenant)
                if problem is not None:
                    self._queue.remove(entry)
                    self._dequeued(entry)
                    refused.append((entry.future, problem))
            self._cv.notify_all()
        settings = policy.alerts
        self.alerts.levels, self.alerts.command = sorted(settings.levels), settings.command
        self.alerts.hysteresis, self.alerts.hold_down = settings.hysteresis, settings.hold_down
        for future, (code, message) in refused:
            self._reject(future, code, f"{message} (policy reloaded while it was queued)")
        return len(refused)

    @staticmethod
    def _burst(tenant: Tenant) -> int:
        return tenant.burst or max(1, math.ceil(tenant.rate or 1))

    def _reject(self, future: Future, code: str, message: str) -> Future:
        """Resolve the JobFuture `future` as `rejected` (counted, alerted, audited when the log can be written)."""
        with self._cv:
            self._tenants.setdefault(future.tenant, TenantUsage()).rejections += 1
        self.metrics.rejections.labels(code, future.tenant).inc()
        self.alerts.emit("rejected", tenant=future.tenant, job_id=future.spec.job_id, reason=code, message=message)
        try:
            self._resolve(future, Verdict.rejected, message)
        except OSError:
            pass  # the log is full: the record waits in memory (AuditLog); the rejection stands
        return future
