"""Supervisor-side monitoring of one job: measurement, then decision.

`JobTree.read()` and the job cgroup's `stats()` measure; `breaches()` and `kernel_breaches()` decide
(pure functions of limits and a reading); the supervisor acts. Runs in the supervisor because
Taichi holds the GIL for whole kernel launches: a thread inside the job would be starved.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..core.limits import Limits
from ..core.models import TIMELINE_MAX, Sample, Termination, Violation
from ..core.units import duration
from ..job.cgroup import CgroupLimits, CgroupStats, JobCgroup
from ..job.cgroup.common import page_floor
from ..job.disk import JobDir
from .gpu import GpuWatch
from .tree import JobTree, Reading

log = logging.getLogger("sandbox.watch.monitor")
WARN_LEVELS = (0.8, 0.9)
# Breaches that get SIGKILL at once: waiting a grace period near OOM (host or device) or in a fork
# storm only makes things worse for everyone else.
IMMEDIATE_KILL = ("memory", "gpu_memory", "processes")
LIMIT_SLACK = 1 << 20  # an OOM at the limit leaves the charge within a charge batch (64 pages) of it


def watched(limits: Limits, gpu_limit: int | None) -> dict[str, float]:
    """Watched resource -> its limit, in the order breaches are decided. `gpu_limit` is in bytes
    (a fractional gpu_memory limit resolved against the device)."""
    limits_by_resource = {"wall_time": limits.wall_time, "cpu_time": limits.cpu_time, "memory": limits.memory,
                          "gpu_memory": gpu_limit, "processes": limits.max_processes, "output": limits.max_output,
                          "disk": limits.disk}
    return {name: float(value) for name, value in limits_by_resource.items() if value is not None}


def breaches(watched_limits: dict[str, float], reading: Reading,
             elapsed: float) -> list[tuple[str, float, float, float]]:
    """(resource, limit, observed, fraction) for every watched limit that has a reading."""
    memory = reading.memory if reading.memory is not None else reading.rss
    observed = {"wall_time": elapsed, "cpu_time": reading.cpu, "memory": memory,
                "gpu_memory": reading.gpu_memory, "processes": reading.processes, "output": reading.output,
                "disk": reading.disk}
    out = []
    for resource, limit in watched_limits.items():
        value = observed[resource]
        if value is not None:
            out.append((resource, limit, float(value), value / limit))
    return out


def kernel_breaches(stats: CgroupStats, limits: CgroupLimits) -> list[tuple[str, float, float]]:
    """(resource, limit, observed) for what the kernel already enforced in the job's cgroup: an OOM
    kill at the job's own limit (observed: the kernel's peak charge; at an OOM kill the charge stood
    at the limit; see `own_limit_oom`) and forks refused at pids.max (observed: tasks)."""
    out = []
    if own_limit_oom(stats, limits) and limits.memory is not None:
        peak = stats.memory_peak if stats.memory_peak is not None else limits.memory
        out.append(("memory", float(limits.memory), float(peak)))
    if stats.pids_refused and limits.tasks is not None:
        out.append(("processes", float(limits.tasks), float(limits.tasks)))
    return out


def own_limit_oom(stats: CgroupStats, limits: CgroupLimits) -> bool:
    """Whether the kernel OOM-killed a process of the job because the job's own cgroup reached its
    memory limit: v2 counts that (memory.events `oom`); v1 does not (memory.failcnt stays 0 on
    recent kernels), so there the evidence is the peak charge at the limit. An OOM kill without
    either was an ancestor cgroup's or the host's (node memory pressure), not the job's."""
    if not stats.oom_kills or limits.memory is None:
        return False
    return bool(stats.limit_hits) or (stats.memory_peak is not None
                                       and stats.memory_peak >= page_floor(limits.memory) - LIMIT_SLACK)


@dataclass
class Timeline:
    """Bounded list of samples: when full, every other sample is dropped (resolution halves)."""

    samples: list[Sample] = field(default_factory=list)
    stride: int = 1
    _n: int = 0

    def add(self, sample: Sample) -> None:
        self._n += 1
        if self._n % self.stride:
            return
        self.samples.append(sample)
        if len(self.samples) >= TIMELINE_MAX:
            self.samples = self.samples[::2]
            self.stride *= 2


class JobControl:
    """A handle on one running job for its submitter: `cancel()` asks the supervisor to end it
    (SIGTERM, grace, SIGKILL; verdict `cancelled`); `lease_until()` / `lease_lost()` hold it to a
    cluster lease (verdict `crashed` when it lapses). Safe to call from any thread, before or while
    the job runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self.reason: str | None = None  # why, when the canceller says (the verdict's reason)
        self._wake: Callable[[], None] | None = None
        self.preempted: str | None = None  # why, when the job was preempted rather than cancelled
        self.requeue = False  # ... and goes back to its executor's queue
        self.lease_lapsed: str | None = None  # why, when the job was ended for its lease
        self.lease: float | None = None  # the lease's end (time.monotonic()), None: no lease
        self._renewed = 0.0  # when it was last set
        self._send_lock = threading.Lock()  # forwarded in the order set
        self._send: Callable[[float | None], None] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def preempt(self, reason: str, requeue: bool = False) -> bool:
        """End the job as `cancel()` does, with verdict `preempted` and `reason`; False (and nothing
        done) when it was already cancelled or preempted."""
        with self._lock:
            if self.preempted is not None or self._cancelled:
                return False
            self.preempted, self.requeue = reason, requeue
        self.cancel()
        return True

    def lease_until(self, deadline: float | None) -> None:
        """Set, extend or clear (None) the job's cluster lease: its end as an absolute time.monotonic()
        (CLOCK_MONOTONIC, one clock for every process of the node). Once it passes, the supervisor
        ends the job as `lease_lost()` does. With the fork-server launcher the fork-server is told at
        once (at the launch when called before it) and SIGKILLs the job itself grace +
        sandbox.job.backstop.BACKSTOP_SLACK seconds past the deadline should the supervisor not have
        ended it (frozen); with the exec launcher only the supervisor enforces it. A lease that lapsed
        stays lapsed."""
        with self._lock:
            if self.lease_lapsed is not None:
                return
            self.lease, self._renewed = deadline, time.monotonic()
            wake = self._wake
        self._forward()
        if wake is not None:
            wake()

    def lease_lost(self, reason: str) -> None:
        """The authority says the lease is gone: end the job now as `cancel()` does, verdict `crashed`
        with `reason`; nothing when the job was already cancelled, preempted or ended for its lease."""
        with self._lock:
            if self.preempted is not None or self._cancelled or self.lease_lapsed is not None:
                return
            self.lease_lapsed = reason
        self.cancel()

    def lapse_reason(self, at: float, ended: str) -> str:
        """The verdict's reason for a lease that lapsed at `at` (time.monotonic()); `ended`: who ended the job."""
        with self._lock:
            since = at - self._renewed if self.lease is not None else None
        renewed = f" (not renewed for {duration(since)})" if since is not None and since >= 0 else ""
        return f"its cluster lease lapsed{renewed}: {ended}"

    def check_lease(self, now: float) -> None:
        """Called by the monitor: past the lease's end, lose it (`lease_lost`)."""
        deadline = self.lease
        if deadline is not None and now >= deadline and self.lease_lapsed is None:
            self.lease_lost(self.lapse_reason(now, "the node ended the job"))

    def forward(self, send: Callable[[float | None], None] | None) -> None:
        """Called by the supervisor: `send(deadline)` hands each lease deadline to the launcher
        (Launched.lease) from now on, the current one at once; None: no more (the job ended)."""
        with self._send_lock:
            self._send = send
        if send is not None:
            self._forward()

    def _forward(self) -> None:
        with self._send_lock:
            if self._send is not None and self.lease_lapsed is None:
                self._send(self.lease)

    def termination(self) -> Termination:
        """How the supervisor records the end it asked for."""
        if self.preempted is not None:
            return Termination(reason="preempted", detail=self.preempted)
        if self.lease_lapsed is not None:
            return Termination(reason="lease", detail=self.lease_lapsed)
        return Termination(reason="cancelled", detail=self.reason or "")

    def cancel(self, reason: str | None = None) -> None:
        """`reason`: the verdict's reason (default "cancelled by request"); the first one given stays."""
        with self._lock:
            self._cancelled = True
            self.reason = self.reason or reason
            wake = self._wake
        if wake is not None:
            wake()

    def attach(self, wake: Callable[[], None]) -> None:
        """Called by the monitor: `wake` makes it look at the cancellation at once."""
        with self._lock:
            self._wake = wake
        if self._cancelled:
            wake()


class MonitorLoop:
    """One thread that ticks every job's Monitor when it is due. Due times sit on a grid of each
    job's poll interval, so concurrent jobs share one wake-up per interval (a thread per job cost
    more in wake-ups than in measuring); a wall deadline or `wake()` brings a tick forward."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._due: dict["Monitor", float] = {}
        self._thread: threading.Thread | None = None

    def add(self, monitor: "Monitor") -> None:
        with self._cv:
            self._due[monitor] = 0.0  # first tick at once
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="tsbx-monitor", daemon=True)
                self._thread.start()
            self._cv.notify()

    def remove(self, monitor: "Monitor") -> None:
        with self._cv:
            self._due.pop(monitor, None)

    def wake(self, monitor: "Monitor") -> None:
        with self._cv:
            if monitor in self._due:
                self._due[monitor] = 0.0
                self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                now = time.monotonic()
                due = [m for m, at in self._due.items() if at <= now]
                if not due:
                    self._cv.wait(min(self._due.values(), default=now + 1.0) - now)
                    continue
                for m in due:
                    self._due[m] = m.next_due(now)
            for m in due:
                try:
                    m.tick_if_running()
                except Exception:  # noqa: BLE001 - one job's failure must not stop every job's limits
                    log.exception("monitor tick failed for job pid %s", m.tree.root_pid)


MONITOR_LOOP = MonitorLoop()


class Monitor:
    """Samples one job every `poll_interval` (driven by the shared MonitorLoop); records warnings and
    reports the first breach.

    `on_breach(violation)` is called at most once per job, in a thread of its own (it performs the
    termination and may wait out the grace period while sampling goes on). A cancelled `control`
    leads to `on_breach(None)` instead.

    With a job `cgroup`, its counters decide cpu_time and memory, and the kernel's own enforcement
    (an OOM kill, a refused fork) is a breach; a memory charge at the limit is not one by itself
    (the kernel reclaims page cache there and OOM-kills only what it cannot reclaim).

    With a `disk` limit its work dir is measured every tick (sandbox.job.disk). Reaching the limit
    ends the job: SIGTERM and grace when the kernel already refuses its writes (an image of its
    own), SIGKILL at once when polled (each moment more fills the host's disk).
    """

    def __init__(self, tree: JobTree, limits: Limits, started: float, now_epoch: Callable[[], float],
                 output_bytes: Callable[[], int], on_breach: Callable[[Violation | None], None],
                 on_sample: Callable[[Sample], None] | None = None, gpu: GpuWatch | None = None,
                 gpu_limit: int | None = None, control: JobControl | None = None,
                 cgroup: JobCgroup | None = None, disk: JobDir | None = None) -> None:
        self.tree, self.limits, self.started, self.gpu, self.cgroup = tree, limits, started, gpu, cgroup
        self.disk = disk
        self.watched = watched(limits, gpu_limit if gpu is not None else None)
        self.peak_gpu: int | None = None
        self.gpu_unreported = 0  # most job processes at once for which NVML gave no memory figure
        self._epoch, self._output, self._on_breach, self._on_sample = now_epoch, output_bytes, on_breach, on_sample
        self._running = False
        self._tick_lock = threading.Lock()
        self._terminator: threading.Thread | None = None
        self.timeline = Timeline()
        self.warnings: list[Violation] = []
        self.peak = Reading(0.0, 0, 0, 0.0, 0)
        self._warned: set[tuple[str, float]] = set()
        self._breached = False
        self.control = control

    def start(self) -> None:
        self._running = True
        MONITOR_LOOP.add(self)
        if self.control is not None:
            self.control.attach(self.wake)

    def wake(self) -> None:
        """Tick now (e.g. the output counter just passed its limit)."""
        MONITOR_LOOP.wake(self)

    def stop(self) -> None:
        """No more ticks; returns once any tick in progress and the termination have finished."""
        MONITOR_LOOP.remove(self)
        with self._tick_lock:
            self._running = False
        if self._terminator is not None:
            self._terminator.join()

    def next_due(self, now: float) -> float:
        interval = self.limits.poll_interval
        due = (math.floor(now / interval) + 1) * interval
        if self.limits.wall_time is not None:
            due = min(due, max(self.started + self.limits.wall_time, now + 0.001))
        lease = self.control.lease if self.control is not None else None
        if lease is not None:
            due = min(due, max(lease, now + 0.001))
        return due

    def tick_if_running(self) -> None:
        with self._tick_lock:
            if self._running:
                self.tick()

    def _breach(self, violation: Violation | None) -> None:
        self._breached = True
        self._terminator = threading.Thread(target=self._on_breach, args=(violation,), daemon=True,
                                            name=f"tsbx-terminate-{self.tree.root_pid}")
        self._terminator.start()

    def tick(self) -> Reading:
        reading = self.tree.read()
        stats = self.cgroup.stats(peak=False) if self.cgroup is not None else None
        if stats is not None:  # the kernel's counters replace the polled ones where it keeps them
            reading.cpu = stats.cpu_seconds if stats.cpu_seconds is not None else reading.cpu
            reading.memory = stats.memory
        reading.output = self._output()
        reading.disk = self.disk.usage() if self.disk is not None else None
        gpu = self.gpu.read(reading.pids) if self.gpu is not None else None
        if gpu is not None:
            reading.gpu_memory = gpu.used
            self.peak_gpu = max(self.peak_gpu or 0, gpu.used)
            self.gpu_unreported = max(self.gpu_unreported, gpu.unknown_pids)
        elapsed = reading.t - self.started
        self.peak = Reading(reading.t, max(self.peak.rss, reading.rss), max(self.peak.vms, reading.vms),
                            max(self.peak.cpu, reading.cpu), max(self.peak.processes, reading.processes),
                            output=reading.output, memory=_max(self.peak.memory, reading.memory),
                            disk=_max(self.peak.disk, reading.disk))
        sample = Sample(t=round(elapsed, 4), rss=reading.rss, vms=reading.vms, cpu=round(reading.cpu, 4),
                        processes=reading.processes, output=reading.output, gpu_memory=reading.gpu_memory,
                        memory=reading.memory, disk=reading.disk)
        self.timeline.add(sample)
        if self._on_sample is not None:
            self._on_sample(sample)
        if self.control is not None:
            self.control.check_lease(time.monotonic())
        if self.control is not None and self.control.cancelled and not self._breached:
            self._breach(None)
        if stats is not None and not self._breached:
            if stats.oom_kills:  # the kernel's peak, read only when it is the evidence
                stats = self.cgroup.stats()
            for resource, limit, value in kernel_breaches(stats, self.cgroup.limits)[:1]:
                self._breach(Violation(at=self._epoch(), pid=None, resource=resource, limit=limit,
                                       observed=value, action="sigkill", detected_by="cgroup"))
        for resource, limit, value, fraction in breaches(self.watched, reading, elapsed):
            pid = reading.top_rss_pid if resource == "memory" else self.tree.root_pid
            kernel_decides = resource == "memory" and reading.memory is not None
            reached = fraction > 1.0 if resource == "processes" else fraction >= 1.0  # max_processes may all run
            if reached and not self._breached and not kernel_decides:
                action = "sigkill" if resource in IMMEDIATE_KILL or (resource == "disk" and self.disk.polled) \
                    else "sigterm"
                self._breach(Violation(at=self._epoch(), pid=pid, resource=resource, limit=limit,
                                       observed=value, action=action, detected_by="monitor"))
            for level in WARN_LEVELS:
                if fraction >= level and (resource, level) not in self._warned:
                    self._warned.add((resource, level))
                    self.warnings.append(Violation(at=self._epoch(), pid=pid, resource=resource,
                                                   limit=limit, observed=value, action="warn",
                                                   detected_by="monitor"))
        return reading


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)
