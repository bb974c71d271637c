"""Supervisor-side monitoring of one job's process tree: measurement, then decision.

`JobTree.read()` measures (psutil, one pass over the tree); `breaches()` decides (pure function of
limits and a reading); the supervisor acts. Runs in the supervisor because Taichi holds the GIL for
whole kernel launches: a thread inside the job would be starved.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from .gpu import GpuWatch
from .limits import Limits
from .models import TIMELINE_MAX, Sample, Violation

log = logging.getLogger("sandbox.monitor")
WARN_LEVELS = (0.8, 0.9)
# Breaches that get SIGKILL at once: waiting a grace period near OOM (host or device) or in a fork
# storm only makes things worse for everyone else.
IMMEDIATE_KILL = ("memory", "gpu_memory", "processes")


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
    pids: list[int] = field(default_factory=list)
    gpu_memory: int | None = None


class ProcessTable:
    """Parent pid -> child pids for the whole machine, from one /proc scan shared by every monitor
    and refreshed at most every `max_age` seconds (one default poll interval): the scan is most of
    a tick's cost, so it is done once per interval however many jobs run. A new process is
    therefore seen at most one interval late."""

    def __init__(self, max_age: float = 0.05) -> None:
        self.max_age = max_age
        self._lock = threading.Lock()
        self._at = -1.0
        self._children: dict[int, list[int]] = {}

    def children(self) -> dict[int, list[int]]:
        with self._lock:
            now = time.monotonic()
            if now - self._at > self.max_age:
                self._children = self._scan()
                self._at = now
            return self._children

    @staticmethod
    def _scan() -> dict[int, list[int]]:
        table: dict[int, list[int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
                ppid = int(stat[stat.rfind(b")") + 2:].split(maxsplit=2)[1])
            except (OSError, ValueError, IndexError):
                continue
            table.setdefault(ppid, []).append(int(name))
        return table


PROCESS_TABLE = ProcessTable()


class JobTree:
    """Every process that ever belonged to one job, tracked by (pid, create time) against pid reuse."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[int, float] = {}
        self._lock = threading.RLock()  # the monitor reads while a termination thread signals
        try:
            self._root: psutil.Process | None = psutil.Process(root_pid)
            self._procs[root_pid] = self._root
        except psutil.Error:
            self._root = None

    def _discover(self) -> None:
        """Adopt every descendant of a tracked process (one shared /proc scan per tick)."""
        children = PROCESS_TABLE.children()
        stack = [pid for pid, proc in self._procs.items() if pid in children and _running(proc)]
        while stack:
            for kid in children.get(stack.pop(), ()):
                if kid not in self._procs:
                    try:
                        self._procs[kid] = psutil.Process(kid)
                    except psutil.Error:
                        continue
                    stack.append(kid)

    def alive(self) -> list[psutil.Process]:
        """Tracked processes still running (zombies excluded)."""
        with self._lock:
            self._discover()
            return [p for p in self._procs.values() if _running(p)]

    def read(self) -> Reading:
        """One pass over the tree."""
        with self._lock:
            return self._read()

    def _read(self) -> Reading:
        self._discover()
        rss = vms = 0
        pids = []
        top_pid, top_rss = None, -1
        for pid, proc in list(self._procs.items()):
            try:
                with proc.oneshot():
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        continue
                    mem = proc.memory_info()
                    times = proc.cpu_times()
            except psutil.NoSuchProcess:
                del self._procs[pid]  # gone for good; its last CPU reading stays in the sum
                continue
            except psutil.Error:
                continue
            pids.append(pid)
            rss += mem.rss
            vms += mem.vms
            self._cpu[pid] = max(self._cpu.get(pid, 0.0), times.user + times.system)
            if mem.rss > top_rss:
                top_pid, top_rss = pid, mem.rss
        return Reading(time.monotonic(), rss, vms, sum(self._cpu.values()), len(pids), top_pid, pids=pids)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watched(limits: Limits, gpu_limit: int | None) -> dict[str, float]:
    """Watched resource -> its limit, in the order breaches are decided. `gpu_limit` is in bytes
    (a fractional gpu_memory limit resolved against the device)."""
    limits_by_resource = {"wall_time": limits.wall_time, "cpu_time": limits.cpu_time, "memory": limits.memory,
                          "gpu_memory": gpu_limit, "processes": limits.max_processes, "output": limits.max_output}
    return {name: float(value) for name, value in limits_by_resource.items() if value is not None}


def breaches(watched_limits: dict[str, float], reading: Reading,
             elapsed: float) -> list[tuple[str, float, float, float]]:
    """(resource, limit, observed, fraction) for every watched limit that has a reading."""
    observed = {"wall_time": elapsed, "cpu_time": reading.cpu, "memory": reading.rss,
                "gpu_memory": reading.gpu_memory, "processes": reading.processes, "output": reading.output}
    out = []
    for resource, limit in watched_limits.items():
        value = observed[resource]
        if value is not None:
            out.append((resource, limit, float(value), value / limit))
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


class JobControl:
    """A handle on one running job for its submitter: `cancel()` asks the supervisor to end it
    (SIGTERM, grace, SIGKILL; verdict `cancelled`). Safe to call from any thread, before or while
    the job runs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cancelled = False
        self._wake: Callable[[], None] | None = None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
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
    """

    def __init__(self, tree: JobTree, limits: Limits, started: float, now_epoch: Callable[[], float],
                 output_bytes: Callable[[], int], on_breach: Callable[[Violation | None], None],
                 on_sample: Callable[[Sample], None] | None = None, gpu: GpuWatch | None = None,
                 gpu_limit: int | None = None, control: JobControl | None = None) -> None:
        self.tree, self.limits, self.started, self.gpu = tree, limits, started, gpu
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
        reading.output = self._output()
        gpu = self.gpu.read(reading.pids) if self.gpu is not None else None
        if gpu is not None:
            reading.gpu_memory = gpu.used
            self.peak_gpu = max(self.peak_gpu or 0, gpu.used)
            self.gpu_unreported = max(self.gpu_unreported, gpu.unknown_pids)
        elapsed = reading.t - self.started
        self.peak = Reading(reading.t, max(self.peak.rss, reading.rss), max(self.peak.vms, reading.vms),
                            max(self.peak.cpu, reading.cpu), max(self.peak.processes, reading.processes),
                            output=reading.output)
        sample = Sample(t=round(elapsed, 4), rss=reading.rss, vms=reading.vms, cpu=round(reading.cpu, 4),
                        processes=reading.processes, output=reading.output, gpu_memory=reading.gpu_memory)
        self.timeline.add(sample)
        if self._on_sample is not None:
            self._on_sample(sample)
        if self.control is not None and self.control.cancelled and not self._breached:
            self._breach(None)
        for resource, limit, value, fraction in breaches(self.watched, reading, elapsed):
            pid = reading.top_rss_pid if resource == "memory" else self.tree.root_pid
            if fraction >= 1.0 and not self._breached:
                action = "sigkill" if resource in IMMEDIATE_KILL else "sigterm"
                self._breach(Violation(at=self._epoch(), pid=pid, resource=resource, limit=limit,
                                       observed=value, action=action, detected_by="monitor"))
            for level in WARN_LEVELS:
                if fraction >= level and (resource, level) not in self._warned:
                    self._warned.add((resource, level))
                    self.warnings.append(Violation(at=self._epoch(), pid=pid, resource=resource,
                                                   limit=limit, observed=value, action="warn",
                                                   detected_by="monitor"))
        return reading
