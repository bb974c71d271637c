"""SandboxExecutor: many jobs on one node, with admission control, tenant quotas, priorities, alerts
and metrics. Shaped like `concurrent.futures`: `submit(spec) -> Future[JobResult]`, `map`, `shutdown`.

Admission (at `submit`, before anything starts):
  1. the spec resolves (profile, tenant, job type) and its demand fits the node's total capacity;
  2. its demand fits the tenant's hard quotas (memory, GPU memory) on its own;
  3. the tenant's submission rate (token bucket) allows it;
  otherwise the future resolves at once with verdict `rejected` and the reason.
  4. the tenant's queue has room, else `QueueFull` (or wait for room, caller's choice).
Scheduling (worker threads): the first queued job in `scheduling`'s order (strict priority, then
fair share and bounded ageing within a priority, then FIFO) that fits what is free now (node
capacity and the tenant's concurrency and quotas) runs next. Once the first job has waited
RESERVE_AFTER seconds without fitting, nothing is started past it until it fits: no job waits
longer than RESERVE_AFTER plus the time for running jobs to free its resources.
Real memory (sandbox.node.pressure): a job that fits the reservations also waits while the node's
available memory does not cover its reservation + `[node] memory_headroom`, or PSI memory pressure
is past `[node] memory_pressure_wait`; its future's `waiting` says why. A watch thread reads the
node every pressure.INTERVAL seconds and wakes the workers (`nodememory`, which also evicts
preemptible jobs past the eviction threshold).
Preemption (`preemption`): a queued job that does not fit ends preemptible running jobs of lower
priorities to make room; nothing ranked after it starts until they are gone.
Admission's checks, the `submitted` record and a policy reload are in `admission`.
Lock rule: `_cv` guards the queue, the tenants' state and the capacity in use, and nothing that can
block runs under it: jobs, Ray submissions, quota.json and audit writes, and alert delivery
(`Alerts.emit` only queues) all happen without it.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..core.limits import Policy, Tenant
from ..core.models import JobResult, JobSpec, Verdict, as_spec
from ..core.ratelimit import TokenBucket
from .admission import Admission
from .alerts import Alerts
from .future import JobFuture
from .metrics import Metrics, quota_gauges
from .nodememory import NodeMemory
from .pressure import Probe, Reading, Watch
from .quotas import Capacity, Demand, QuotaFile, TenantUsage, fits, node_capacity, report
from .preemption import Preemption
from .scheduling import Entry, FairShare, rank
from .supervisor import Supervisor

RESERVE_AFTER = 30.0
ALERTS_FLUSH = 10.0  # seconds `shutdown(wait=True)` gives queued alerts to be delivered
class QueueFull(Exception):
    """The tenant's (or executor's) queue is at its bound; the message says which."""


class SandboxExecutor(Admission, Preemption, NodeMemory):
    """Runs JobSpecs on this node through one Supervisor. Thread-safe; use as a context manager."""

    def __init__(self, max_concurrent: int | None = None, capacity: Capacity | None = None,
                 policy: Policy | None = None, supervisor: Supervisor | None = None,
                 alert_hook: Callable[[dict], None] | None = None, metrics: Metrics | None = None,
                 state_file: str | os.PathLike | None = None, probe: Probe | None = None,
                 workers: int | None = None) -> None:
        """`probe`: what reads the node's real memory (default: `_node_probe()`); `workers`: threads
        that pick and start jobs (default `max_concurrent`: each runs its job to the end)."""
        self.supervisor = supervisor if supervisor is not None else Supervisor(policy)
        self._owns_supervisor = supervisor is None
        self.policy = self.supervisor.policy
        probe = probe or self._node_probe()
        self._measured: tuple[int | None, int | None] = (None, None)  # GPU memory, cgroup limit: for a reload
        if capacity is None:
            devices, _ = self.supervisor.gpu_facts()
            self._measured = (devices[0].memory_total if devices else None,
                              probe.read().cgroup_limit if probe is not None else None)
            capacity = node_capacity(self.policy, *self._measured)
        self.capacity = capacity
        self.max_concurrent = max_concurrent or capacity.cpu_slots
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.watch("quota", lambda: quota_gauges(self.quota_state()))
        settings = self.policy.alerts
        self.alerts = Alerts(self.supervisor.audit, settings.levels, alert_hook, settings.command,
                             on_drop=self.metrics.alerts_dropped.inc, hysteresis=settings.hysteresis,
                             hold_down=settings.hold_down)
        self.quota_file = QuotaFile(Path(state_file) if state_file else
                                    self.policy.settings.resolved_state_dir() / "quota.json")
        self._cv = threading.Condition()
        self._queue: list[Entry] = []
        self._seq = itertools.count()
        self._used = Demand(0, 0, 0)
        self._tenants: dict[str, TenantUsage] = {}
        self._running: set[Entry] = set()
        self._abandoned: list[Entry] = []  # requeued jobs cancelled in the queue: resolved by a worker
        self._fair = FairShare(self.policy.scheduler)
        self._shutdown = self._cancel_queued = False
        self.pressure: Reading | None = None  # the latest reading of the node's memory
        self._watch = Watch(probe, self._read_pressure) if probe is not None else None
        self._workers = [threading.Thread(target=self._work, name=f"tsbx-exec-{i}", daemon=True)
                         for i in range(workers or self.max_concurrent)]
        for worker in self._workers:
            worker.start()

    def __enter__(self) -> "SandboxExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown(wait=True)

    # --- admission -------------------------------------------------------------------------------

    def _tenant(self, name: str) -> Tenant:
        return self.policy.tenants.get(name) or Tenant()

    def submit(self, spec: JobSpec | Callable, *, block: bool = False, timeout: float | None = None,
               quiet: bool = False) -> JobFuture:
        """Queue `spec` (a JobSpec, or a callable to run without arguments: use JobSpec(kernel=fn,
        args=...) or functools.partial for arguments). Returns a future that may already hold a
        `rejected` result. While the job runs its stdout and stderr appear on `sys.stdout` and
        `sys.stderr` (interleaved with other jobs' at chunk boundaries) unless `quiet`. Raises
        QueueFull when the tenant's queue is full (after waiting up to `timeout` when `block`),
        ConfigError for a callable that cannot be shipped, and RuntimeError after shutdown."""
        spec = as_spec(spec)
        future = JobFuture(spec, quiet)
        name = future.tenant
        limits, need, problem = self._check(spec, name)
        if problem is not None:
            return self._reject(future, *problem)
        tenant = self._tenant(name)
        job_type = self.policy.job_types.get(spec.job_type) if spec.job_type else None
        priority = self.policy.priority(name, spec.job_type, spec.priority)
        preemptible = tenant.preemptible or (job_type is not None and job_type.preemptible)
        requeue = tenant.requeue or (job_type is not None and job_type.requeue)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            if self._shutdown:
                raise RuntimeError("cannot submit after shutdown")
            state = self._tenants.setdefault(name, TenantUsage())
            if tenant.rate is not None and state.bucket is None:
                state.bucket = TokenBucket(tenant.rate, self._burst(tenant))
            if state.bucket is not None and not state.bucket.take():
                rate_problem = ("rate", f"tenant {name} submission rate {tenant.rate:g}/s exceeded")
            else:
                rate_problem = None
                while tenant.max_queued is not None and state.queued >= tenant.max_queued:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if not block or (remaining is not None and remaining <= 0) or self._shutdown:
                        raise QueueFull(f"tenant {name} has {state.queued} queued jobs (max_queued="
                                        f"{tenant.max_queued})")
                    self._cv.wait(remaining)
                entry = Entry(future, need, priority, next(self._seq), preemptible=preemptible, requeue=requeue,
                              recorded=False)  # unseen until its `submitted` record is written
                self._enqueue(entry)
        if rate_problem is not None:
            return self._reject(future, *rate_problem)
        self._record_submitted(entry, limits)
        return future

    def map(self, specs: Iterable[JobSpec | Callable], timeout: float | None = None,
            quiet: bool = False) -> Iterator[JobResult]:
        """Submit every spec (or callable), then yield results in submission order (blocking on queue
        bounds); `quiet` as for `submit`."""
        futures = [self.submit(spec, block=True, quiet=quiet) for spec in specs]
        deadline = None if timeout is None else time.monotonic() + timeout

        def results():
            for f in futures:
                yield f.result(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return results()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, cancel_running: bool = False) -> None:
        """Stop accepting jobs. `cancel_futures` cancels queued jobs; `cancel_running` ends running ones
        (verdict `cancelled`). With `wait`, returns when every started job has its verdict."""
        with self._cv:
            self._shutdown = True
            self._cancel_queued = cancel_futures
            if cancel_futures:
                for entry in self._queue:
                    entry.future.cancel()
                self._abandoned += [entry for entry in self._queue if entry.runs]
                self._queue.clear()
                for state in self._tenants.values():
                    state.queued = 0
            if cancel_running:
                for entry in self._running:
                    entry.future.control.cancel()
            self._cv.notify_all()
        if wait:
            for worker in self._workers:
                worker.join()
            if self._watch is not None:
                self._watch.stop()
            self.alerts.close(timeout=ALERTS_FLUSH)
            if self._owns_supervisor:
                self.supervisor.close()

    # --- scheduling ------------------------------------------------------------------------------

    def _fits(self, entry: Entry) -> bool:
        name = entry.future.tenant
        return fits(entry.demand, self._used, self.capacity, self._tenant(name), self._tenants[name])

    def _pick(self, take: bool = True) -> Entry | None:
        """The queued job to start next, taken off the queue, or None; preempts running jobs for the
        first that does not fit, where that makes room (call under _cv). `take` False: only that
        (after a submission, when every worker may be busy running what is to be preempted)."""
        now = time.monotonic()
        for entry in [e for e in self._queue if e.future.cancelled() or e.future.cancel_asked]:
            self._queue.remove(entry)
            self._dequeued(entry)
            if entry.runs:  # its future runs on: resolved outside the lock
                self._abandoned.append(entry)
        names = set(self.policy.tenants) | set(self._tenants)
        factors = self._fair.factors({name: self._tenant(name).shares for name in names}, time.time())
        recorded = (e for e in self._queue if e.recorded)  # not one still writing its record
        order = sorted(recorded, key=lambda e: rank(e.priority, factors[e.future.tenant], now - e.submitted, e.seq,
                                                    self.policy.scheduler))
        candidates = self._candidates()
        for position, entry in enumerate(order):
            fits = self._fits(entry)
            if fits and self._memory_allows(entry):
                if not take:
                    return None  # a worker is free for it
                self._queue.remove(entry)
                self._dequeued(entry)
                return entry
            if not fits and self._make_room(entry, candidates):
                return None  # the room it gets is its own: nothing after it starts meanwhile
            if position == 0 and now - entry.submitted >= RESERVE_AFTER:
                return None  # reserve the node for the job that has waited longest at the top
        return None

    def _enqueue(self, entry: Entry) -> None:
        """Bookkeeping for a job joining the queue (call under _cv)."""
        state = self._tenants[entry.future.tenant]
        state.queued += 1
        self._queue.append(entry)
        self.metrics.queued.labels(entry.future.tenant).set(state.queued)

    def _dequeued(self, entry: Entry) -> None:
        """Bookkeeping for a job leaving the queue (to run, or cancelled; call under _cv)."""
        state = self._tenants[entry.future.tenant]
        state.queued -= 1
        self.metrics.queued.labels(entry.future.tenant).set(state.queued)

    def _account(self, entry: Entry, sign: int) -> None:
        d, name = entry.demand, entry.future.tenant
        self._used = Demand(self._used.cpu + sign * d.cpu, self._used.memory + sign * d.memory,
                            self._used.gpu_memory + sign * d.gpu_memory)
        state = self._tenants[name]
        state.running += sign
        state.memory += sign * d.memory
        state.gpu_memory += sign * d.gpu_memory
        self.metrics.running.labels(name).set(state.running)
        tenant = self._tenant(name)
        for resource, used, quota in (("concurrency", state.running, tenant.max_concurrent),
                                      ("memory", state.memory, tenant.memory_quota),
                                      ("gpu_memory", state.gpu_memory, tenant.gpu_memory_quota)):
            if quota:
                self.metrics.quota_ratio.labels(name, resource).set(used / quota)
                self.alerts.quota(name, resource, used, quota)

    def _work(self) -> None:
        """A worker: pick under _cv, start the job without it."""
        while True:
            with self._cv:
                entry = self._pick()
                while entry is None and not self._abandoned:
                    if self._shutdown and not self._queue and not self._running:
                        return
                    self._cv.wait(timeout=1.0)
                    entry = self._pick()
                abandoned, self._abandoned = self._abandoned, []
                if entry is not None:
                    self._account(entry, +1)
            self._cancel_requeued(abandoned)
            if entry is None:
                continue
            started = entry.runs > 0 or entry.future.set_running_or_notify_cancel()
            with self._cv:
                if started:
                    entry.started = time.monotonic()
                    self._running.add(entry)
                else:
                    self._account(entry, -1)  # cancelled meanwhile
                state = self._snapshot()
                self._cv.notify_all()
            self.quota_file.save(*state)
            if started:
                self._run(entry)

    def _started(self, entry: Entry) -> dict:
        """Bookkeeping for a job about to start; what its audit record says of its queueing."""
        waited = time.monotonic() - entry.submitted
        self.metrics.queue_wait.labels(entry.future.tenant).observe(waited)
        if entry.future.cancel_asked:  # while it was queued again after a preemption
            entry.future.control.cancel()
        d = entry.demand
        return {"submitted_at": time.time() - waited,
                "reserved": {"memory": d.memory, "gpu_memory": d.gpu_memory, "cpu": d.cpu}}

    def _run(self, entry: Entry) -> None:
        """Run the job in this worker thread to its verdict, then `_finish` it."""
        future = entry.future
        queued = self._started(entry)
        try:
            result = self.supervisor.run(future.spec, control=future.control, on_output=future.echo, queued=queued)
        except BaseException as err:  # noqa: BLE001 - the future must resolve whatever happens
            self._finish(entry, None, err)
            return
        self._finish(entry, result)

    def _finish(self, entry: Entry, result: JobResult | None, failure: BaseException | None = None) -> None:
        """A started job ended with `result` (or raised `failure`): free what it held, resolve its future."""
        future, name = entry.future, entry.future.tenant
        if future.echo is not None:
            future.echo.close()
        with self._cv:
            self._account(entry, -1)
            self._running.discard(entry)
            requeued = result is not None and self._requeue(entry, result)
            if result is not None:
                self._tenants[name].violations += sum(1 for v in result.violations if v.action != "warn")
                self._fair.charge(name, result.usage.cpu_seconds, entry.demand.memory, result.usage.wall_seconds,
                                  time.time())
            state = self._snapshot()
            self._cv.notify_all()
        self.quota_file.save(*state)
        if result is None:
            future.set_exception(failure)
            return
        self.metrics.jobs.labels(result.verdict.value, name).inc()
        self.metrics.duration.labels(name).observe(result.usage.wall_seconds)
        self.metrics.cpu_seconds.labels(name).inc(result.usage.cpu_seconds)
        for v in result.violations:
            if v.action != "warn":
                self.metrics.violations.labels(v.resource, name).inc()
                self.alerts.emit("violation", tenant=name, job_id=result.job_id, resource=v.resource,
                                 limit=v.limit, observed=v.observed, action=v.action)
        if not requeued:
            future.set_result(result)

    def _resolve(self, future: JobFuture, verdict: Verdict, reason: str) -> None:
        """Give a job that ends without running (again) its result and audit record (raises OSError
        when the record cannot be written, the future resolved all the same)."""
        result = JobResult.not_run(future.spec, verdict, reason, launcher=self.supervisor.launcher.name)
        self.metrics.jobs.labels(verdict.value, future.tenant).inc()
        try:
            self.supervisor.audit.record(result, future.spec.tenant, future.spec.job_type)
        finally:
            future.set_result(result)

    # --- reporting -------------------------------------------------------------------------------

    def quota_state(self) -> dict:
        """Per tenant: running, queued, used vs quota, rejections and violations (a JSON-able dict)."""
        with self._cv:
            return self._quota_state()

    def _quota_state(self) -> dict:
        names = set(self.policy.tenants) | set(self._tenants)
        return report({name: (self._tenant(name), self._tenants.get(name, TenantUsage())) for name in names},
                      self._used, self.capacity, time.time())

    def _snapshot(self) -> tuple[int, dict]:
        """The quota state, numbered, for `QuotaFile.save` (call under _cv)."""
        return self.quota_file.number(), self._quota_state()
