"""The node's real memory, measured: what is actually available and how stalled memory is, apart
from what the executor's reservations say. Measurement here; the decisions that use it are the pure
`admission_wait` and `eviction_due`; the executor acts.

What is read (never raises: what cannot be read is None and named in `Reading.notes`):
- `/proc/meminfo` MemAvailable;
- `/proc/pressure/memory` (PSI, CONFIG_PSI kernels): `some`/`full` avg10, the % of the last 10 s in
  which some/all non-idle tasks stalled on memory;
- the service's own memory cgroup and each ancestor with a limit (v1 `memory.limit_in_bytes` and
  `memory.usage_in_bytes`, v2 `memory.max` and `memory.current`; the working set, as the kubelet
  counts it, is usage minus inactive file pages): the room left under the tightest one;
- the jobs' parent cgroup (the sandbox's, under the service's own): what the running jobs use now.
`available` is the smaller of MemAvailable and the cgroup room.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from ..core.limits import Node
from ..job.cgroup.common import read_int, read_keyed, read_text
from ..job.cgroup.host import _within, parse_mountinfo, parse_proc_cgroup, select_hierarchy
from .quotas import _size

INTERVAL = 0.5  # seconds between readings of the watch
# The per-version file names: limit, usage, the memory.stat key of inactive file pages.
FILES = {1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
         2: ("memory.max", "memory.current", "inactive_file")}
UNLIMITED = 1 << 60  # v1 writes "no limit" as a huge page-aligned number


@dataclass(frozen=True)
class Reading:
    """One measurement of the node's memory. Bytes; PSI in % (None: not available)."""

    mem_available: int | None
    cgroup_room: int | None  # the least room under the limits of the service's cgroup and its ancestors
    cgroup_limit: int | None  # the smallest of those limits (the sandbox's memory capacity)
    jobs_memory: int | None  # charged to the jobs' parent cgroup now (None: no such cgroup)
    psi_some10: float | None
    psi_full10: float | None
    notes: tuple[str, ...] = ()
    at: float = 0.0  # time.monotonic()

    @property
    def available(self) -> int | None:
        known = [v for v in (self.mem_available, self.cgroup_room) if v is not None]
        return min(known) if known else None

    def describe(self) -> str:
        """One line: available memory, where it is tightest, and PSI."""
        where = "" if self.cgroup_room is None or self.available != self.cgroup_room else \
            f" (in the service's cgroup, limit {size(self.cgroup_limit)})"
        psi = "PSI not available" if self.psi_some10 is None else f"PSI some avg10 {self.psi_some10:.1f}%"
        return f"{size(self.available)} available{where}, {psi}"


def parse_meminfo(text: str) -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None when the kernel does not report it)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "MemAvailable":
            return int(value.split()[0]) * 1024
    return None


def parse_psi(text: str) -> tuple[float | None, float | None]:
    """(some avg10, full avg10) from a PSI file such as /proc/pressure/memory."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        kind, *fields = line.split()
        for f in fields:
            key, _, value = f.partition("=")
            if key == "avg10":
                found[kind] = float(value)
    return found.get("some"), found.get("full")


def cgroup_room(dirs: list[str], version: int) -> tuple[int | None, int | None]:
    """(the least room, the smallest limit) over the memory limits of cgroup directories `dirs` (the
    service's own and its ancestors); (None, None) when none has a limit. Room = limit - working set."""
    limit_file, usage_file, inactive_key = FILES[version]
    rooms, limits = [], []
    for d in dirs:
        try:
            limit, usage = read_int(f"{d}/{limit_file}"), read_int(f"{d}/{usage_file}")
            if limit is None or usage is None or limit >= UNLIMITED:
                continue
            inactive = read_keyed(f"{d}/memory.stat").get(inactive_key, 0)
        except (OSError, ValueError):
            continue
        rooms.append(max(0, limit - max(0, usage - inactive)))
        limits.append(limit)
    return (min(rooms), min(limits)) if limits else (None, None)


def own_memory_cgroup(mountinfo: str, proc_cgroup: str) -> tuple[int, list[str]] | None:
    """(version, [the directory of this process's memory cgroup, then each ancestor up to the mount])
    from /proc/self/mountinfo and /proc/self/cgroup; None without a memory cgroup in view."""
    chosen = select_hierarchy(parse_mountinfo(mountinfo))
    if chosen is None:
        return None
    version, mounts = chosen
    own = parse_proc_cgroup(proc_cgroup)
    mount = mounts[0] if version == 2 else next((m for m in mounts if "memory" in m.options), None)
    where = _within(mount, own.get("" if version == 2 else "memory", "/")) if mount is not None else None
    if where is None:
        return None
    dirs = [where]
    while dirs[-1] != mount.point and os.path.dirname(dirs[-1]).startswith(mount.point):
        dirs.append(os.path.dirname(dirs[-1]))
    return version, dirs


class Probe:
    """Reads the node's memory. The cgroups are found once (`jobs_parent`: the sandbox's memory cgroup
    parent, see sandbox.job.cgroup.host; None without cgroups). Paths are overridable for tests."""

    def __init__(self, jobs_parent: str | None = None, meminfo: str = "/proc/meminfo",
                 psi: str = "/proc/pressure/memory", cgroup: tuple[int, list[str]] | None | str = "self") -> None:
        self.meminfo, self.psi, self.jobs_parent = meminfo, psi, jobs_parent
        if cgroup == "self":
            try:
                cgroup = own_memory_cgroup(read_text("/proc/self/mountinfo"), read_text("/proc/self/cgroup"))
            except OSError:
                cgroup = None
        self.cgroup = cgroup

    def read(self) -> Reading:
        notes = []
        try:
            available = parse_meminfo(read_text(self.meminfo))
        except OSError as err:
            available = None
            notes.append(f"{self.meminfo}: {err.strerror}")
        try:
            some, full = parse_psi(read_text(self.psi))
        except (OSError, ValueError) as err:  # no CONFIG_PSI, or psi=0 on the kernel command line
            some = full = None
            notes.append(f"memory pressure (PSI) not available: {self.psi}: "
                         f"{getattr(err, 'strerror', None) or err}")
        room, limit = cgroup_room(self.cgroup[1], self.cgroup[0]) if self.cgroup is not None else (None, None)
        jobs = None
        if self.jobs_parent is not None and self.cgroup is not None:
            try:
                jobs = read_int(f"{self.jobs_parent}/{FILES[self.cgroup[0]][1]}")
            except (OSError, ValueError):
                pass
        return Reading(available, room, limit, jobs, some, full, tuple(notes), time.monotonic())


def admission_wait(reading: Reading | None, need: int | None, reserved_running: int, node: Node) -> str | None:
    """Why a job that fits the node's reservations must still wait for real memory, or None.
    `need`: its memory reservation (None: no memory limit, so only the headroom is asked for);
    `reserved_running`: what the running jobs reserve. What they reserve but do not use yet is set
    aside from what is available (all of it when their use is unknown: no cgroups)."""
    if reading is None:
        return None
    psi = reading.psi_some10
    if psi is not None and psi > node.memory_pressure_wait:
        return (f"node memory pressure: PSI some avg10 {psi:.1f}% > {node.memory_pressure_wait:g}% "
                "([node] memory_pressure_wait)")
    if reading.available is None:
        return None
    unused = max(0, reserved_running - (reading.jobs_memory or 0))
    free = reading.available - unused
    wanted = (need or 0) + (node.memory_headroom or 0)
    if free >= wanted:
        return None
    held = f", {size(unused)} of it held for running jobs' reservations" if unused else ""
    what = f"its {size(need)} reservation + " if need else ""
    return (f"node memory: {reading.describe()}{held}; it needs {what}{size(node.memory_headroom or 0)} headroom "
            "([node] memory_headroom)")


def eviction_due(reading: Reading | None, node: Node) -> str | None:
    """The evidence when the node is past its eviction threshold ([node] evict_available: available
    memory below it; evict_pressure: PSI some avg10 above it), else None. Preemptible jobs are then
    ended, lowest priority first, before the kernel's OOM killer acts."""
    if reading is None:
        return None
    if node.evict_available and reading.available is not None and reading.available < node.evict_available:
        return f"node memory pressure: {reading.describe()}, below [node] evict_available {size(node.evict_available)}"
    if reading.psi_some10 is not None and reading.psi_some10 > node.evict_pressure:
        return (f"node memory pressure: PSI some avg10 {reading.psi_some10:.1f}% > [node] evict_pressure "
                f"{node.evict_pressure:g}%")
    return None


class Watch:
    """A daemon thread that reads `probe` every `interval` seconds and hands each Reading to
    `on_reading` (which must not block) until that returns False or `stop()` is called. The first
    reading is taken before the thread starts, so nothing is decided without one."""

    def __init__(self, probe: Probe, on_reading: Callable[[Reading], bool], interval: float = INTERVAL) -> None:
        self.probe, self.on_reading, self.interval = probe, on_reading, interval
        self._stop = threading.Event()
        on_reading(probe.read())
        self._thread = threading.Thread(target=self._run, name="tsbx-pressure", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and self.on_reading(self.probe.read()):
            pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def size(n: int | None) -> str:
    return "unknown" if n is None else _size(n)
