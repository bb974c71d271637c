"""RayExecutor: the SandboxExecutor surface over a Ray cluster.

Admission (rejected verdicts, rate limits, queue bounds), metrics, alerts and the audit of submissions
are the executor's, as on one node. What is cluster-wide is decided by the quota authority
(sandbox.ray.actor): tenant quotas across every driver and entry point, and each node's memory on the
node the job lands on. So the executor itself only bounds the jobs it keeps in flight
(`[cluster] in_flight`, or `max_concurrent`) and starts each at once as a Ray task that waits for its
lease inside the authority (no thread, no polling per job). One thread picks jobs; results come back
through Ray's callbacks, handed to one finishing thread. Priorities order the authority's waiters
(per tenant and per node); preemption and the node's real-memory admission are the node service's.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

from ..core.limits import Policy
from ..core.models import JobResult, JobSpec, Verdict
from ..node.executor import SandboxExecutor
from ..node.quotas import Capacity
from ..node.scheduling import Entry
from ..node.supervisor import Supervisor
from ..watch.monitor import JobControl
from . import jobs
from .options import _ray

CAPACITY_REFRESH = 10.0  # seconds between readings of the largest node, for admission


def largest_node(device_memory: int | None) -> Capacity:
    """What the cluster's largest live node offers (each resource's maximum over the nodes): a job
    that does not fit it can run nowhere."""
    nodes = [n["Resources"] for n in _ray().nodes() if n.get("Alive")]
    cpus = max((int(r.get("CPU", 0)) for r in nodes), default=1)
    memory = max((int(r.get("memory", 0)) for r in nodes), default=0)
    gpus = max((r.get("GPU", 0) for r in nodes), default=0)
    return Capacity(cpu_slots=max(1, cpus), memory=memory,
                    gpu_memory=int(gpus * device_memory) if gpus and device_memory else None)


class _Records:
    """Stands in for the Supervisor inside RayExecutor: the audit log and GPU facts of this driver's
    node; jobs run in Ray tasks, whose own supervisors record them."""

    def __init__(self, policy: Policy) -> None:
        self._local = Supervisor(policy)  # never launches here
        self.policy, self.audit, self.launcher = policy, self._local.audit, self._local.launcher

    def gpu_facts(self):
        return self._local.gpu_facts()

    def close(self) -> None:
        self._local.close()


class RayExecutor(SandboxExecutor):
    """SandboxExecutor whose jobs run as Ray tasks under the cluster's quota authority. `capacity`
    (default: the largest live node, re-read every CAPACITY_REFRESH s) only decides which jobs can
    never run; `max_concurrent` bounds the jobs in flight (default `[cluster] in_flight`);
    `ray_options` go to every task's `.options()`."""

    def __init__(self, max_concurrent: int | None = None, capacity: Capacity | None = None,
                 policy: Policy | None = None, device_memory: int | None = None,
                 ray_options: dict | None = None, **kwargs) -> None:
        policy = policy if policy is not None else Policy()
        self.device_memory, self.ray_options = device_memory, ray_options or {}
        self._fixed_capacity = capacity is not None
        self._capacity_read = time.monotonic()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._cancels = jobs.Canceller()
        self._finisher = threading.Thread(target=self._finishing, name="tsbx-ray-results", daemon=True)
        self._finisher.start()
        super().__init__(max_concurrent=max_concurrent or policy.cluster.in_flight,
                         capacity=capacity or largest_node(device_memory), supervisor=_Records(policy),
                         workers=1, **kwargs)
        self._owns_supervisor = True

    def _node_probe(self) -> None:
        """Jobs run on the cluster's nodes, not the driver's: each node's own service (where one runs)
        admits them against its real memory."""
        return None

    def _check(self, spec: JobSpec, name: str):
        if not self._fixed_capacity and time.monotonic() - self._capacity_read > CAPACITY_REFRESH:
            self.capacity, self._capacity_read = largest_node(self.device_memory), time.monotonic()
        return super()._check(spec, name)

    def _make_room(self, entry: Entry, candidates) -> bool:
        """No preemption: a Ray task cannot be preempted and requeued from here (a node's service
        preempts the jobs it runs)."""
        return False

    def _fits(self, entry: Entry) -> bool:
        """Tenant quotas and node room are the authority's to decide; here only the jobs in flight."""
        return len(self._running) < self.max_concurrent

    def _run(self, entry: Entry) -> None:
        """Start the job's Ray task and return; its result comes back through `_finishing`."""
        future = entry.future
        self._started(entry)
        try:
            ref = jobs.submit(future.spec, self.policy, self.device_memory, quiet=future.echo is None,
                              priority=entry.priority, **self.ray_options)
        except Exception as err:  # noqa: BLE001 - bad Ray options, Ray gone: a verdict, not an exception
            self._finish(entry, JobResult.not_run(future.spec, Verdict.rejected, f"the Ray task could not be "
                                                  f"started: {type(err).__name__}: {err}"[:400], time.time()))
            return
        future.control.attach(_canceller(ref, future.control, self._cancels))
        ref.future().add_done_callback(lambda _: self._done.put((entry, ref)))

    def _finishing(self) -> None:
        """The one thread that turns ended tasks into verdicts (out of Ray's callback thread)."""
        while (item := self._done.get()) is not None:
            entry, ref = item
            try:
                result = jobs.result(ref, timeout=0)
            except BaseException as err:  # noqa: BLE001 - the future must resolve whatever happens
                self._finish(entry, None, err)
            else:
                self._finish(entry, result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False, cancel_running: bool = False) -> None:
        super().shutdown(wait, cancel_futures=cancel_futures, cancel_running=cancel_running)
        if wait:
            self._done.put(None)  # every job has its verdict: the finishing thread ends



def _canceller(ref, control: JobControl, cancels: jobs.Canceller) -> Callable[[], None]:
    """What a cancel of the running job does: a soft `ray.cancel` now and every CANCEL_RESEND s while
    the task runs (Ray drops one that reaches a worker still starting the task)."""
    def cancel() -> None:
        if control.cancelled:
            cancels.cancel(ref)
    return cancel
