"""Supervisor-side monitoring of one job's process tree: measurement, then decision.

`JobTree.read()` measures (psutil, one pass over the tree); `breaches()` decides (pure function of
limits and a reading); the supervisor acts. Runs in the supervisor because Taichi holds the GIL for
whole kernel launches: a thread inside the job would be starved.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from .limits import Limits
from .models import TIMELINE_MAX, Sample, Violation

WARN_LEVELS = (0.8, 0.9)


@dataclass
class Reading:
    """The whole job tree at one instant. `cpu` includes processes that already ended."""

    t: float
    rss: int
    vms: int
    cpu: float
    processes: int
    top_rss_pid: int | None = None
    output: int = 0


class JobTree:
    """Every process that ever belonged to one job, tracked by (pid, create time) against pid reuse."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[int, float] = {}
        try:
            self._root: psutil.Process | None = psutil.Process(root_pid)
            self._procs[root_pid] = self._root
        except psutil.Error:
            self._root = None

    def _discover(self) -> None:
        for parent in [p for p in self._procs.values() if p.pid == self.root_pid or _running(p)]:
            try:
                for kid in parent.children(recursive=True):
                    self._procs.setdefault(kid.pid, kid)
            except psutil.Error:
                continue

    def alive(self) -> list[psutil.Process]:
        """Tracked processes still running (zombies excluded)."""
        self._discover()
        return [p for p in self._procs.values() if _running(p)]

    def read(self) -> Reading:
        """One pass over the tree."""
        self._discover()
        rss = vms = count = 0
        top_pid, top_rss = None, -1
        for pid, proc in list(self._procs.items()):
            try:
                with proc.oneshot():
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        continue
                    mem = proc.memory_info()
                    times = proc.cpu_times()
            except psutil.Error:
                continue
            count += 1
            rss += mem.rss
            vms += mem.vms
            self._cpu[pid] = max(self._cpu.get(pid, 0.0), times.user + times.system)
            if mem.rss > top_rss:
                top_pid, top_rss = pid, mem.rss
        return Reading(time.monotonic(), rss, vms, sum(self._cpu.values()), count, top_pid)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# Watched resource -> the Limits field that bounds it, in the order breaches are decided.
MEASURED = {
    "wall_time": "wall_time",
    "cpu_time": "cpu_time",
    "memory": "memory",
    "processes": "max_processes",
    "output": "max_output",
}


def observed(resource: str, reading: Reading, elapsed: float) -> float:
    return {"wall_time": elapsed, "cpu_time": reading.cpu, "memory": reading.rss,
            "processes": reading.processes, "output": reading.output}[resource]


def breaches(limits: Limits, reading: Reading, elapsed: float) -> list[tuple[str, float, float, float]]:
    """(resource, limit, observed, fraction) for every watched limit, in decision order."""
    out = []
    for resource, field_name in MEASURED.items():
        limit = getattr(limits, field_name)
        if limit is not None:
            value = observed(resource, reading, elapsed)
            out.append((resource, float(limit), float(value), value / limit))
    return out


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


class Monitor(threading.Thread):
    """Samples the job every `poll_interval`; reports warnings and the first breach of each limit.

    `on_breach(violation)` is called from this thread, at most once per job; it performs the
    termination (and may block for the grace period while this monitor keeps no lock).
    """

    def __init__(self, tree: JobTree, limits: Limits, started: float, now_epoch: Callable[[], float],
                 output_bytes: Callable[[], int], on_breach: Callable[[Violation], None],
                 on_sample: Callable[[Sample], None] | None = None) -> None:
        super().__init__(name=f"tsbx-monitor-{tree.root_pid}", daemon=True)
        self.tree, self.limits, self.started = tree, limits, started
        self._epoch, self._output, self._on_breach, self._on_sample = now_epoch, output_bytes, on_breach, on_sample
        self._stopped = False
        self._wake = threading.Event()
        self.timeline = Timeline()
        self.warnings: list[Violation] = []
        self.peak = Reading(0.0, 0, 0, 0.0, 0)
        self._warned: set[tuple[str, float]] = set()
        self._breached = False

    def run(self) -> None:
        while not self._stopped:
            self.tick()
            self._wake.wait(self._next_wait())
            self._wake.clear()

    def wake(self) -> None:
        """Tick now (e.g. the output counter just passed its limit)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self.join()

    def _next_wait(self) -> float:
        interval = self.limits.poll_interval
        if self.limits.wall_time is not None:
            interval = min(interval, max(self.started + self.limits.wall_time - time.monotonic(), 0.001))
        return interval

    def tick(self) -> Reading:
        reading = self.tree.read()
        reading.output = self._output()
        elapsed = reading.t - self.started
        self.peak = Reading(reading.t, max(self.peak.rss, reading.rss), max(self.peak.vms, reading.vms),
                            max(self.peak.cpu, reading.cpu), max(self.peak.processes, reading.processes),
                            output=reading.output)
        sample = Sample(t=round(elapsed, 4), rss=reading.rss, vms=reading.vms, cpu=round(reading.cpu, 4),
                        processes=reading.processes, output=reading.output)
        self.timeline.add(sample)
        if self._on_sample is not None:
            self._on_sample(sample)
        for resource, limit, value, fraction in breaches(self.limits, reading, elapsed):
            pid = reading.top_rss_pid if resource == "memory" else self.tree.root_pid
            if fraction >= 1.0 and not self._breached:
                self._breached = True
                action = "sigkill" if resource in ("memory", "processes") else "sigterm"
                self._on_breach(Violation(at=self._epoch(), pid=pid, resource=resource, limit=limit,
                                          observed=value, action=action, detected_by="monitor"))
            for level in WARN_LEVELS:
                if fraction >= level and (resource, level) not in self._warned:
                    self._warned.add((resource, level))
                    self.warnings.append(Violation(at=self._epoch(), pid=pid, resource=resource,
                                                   limit=limit, observed=value, action="warn",
                                                   detected_by="monitor"))
        return reading
