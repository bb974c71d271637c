"""Measuring one job's process tree from /proc: the source of the timeline, and the fallback for
every limit where no cgroup counts for the kernel.

Holes the polled view closes itself: a main process whose leader thread left with the raw `exit`
syscall is a zombie with live threads (still measured through those threads, its children still
found); CPU of children reaped between two polls counts at once (their reaper's `cutime`/`cstime`).
What it cannot see: memory outside RSS (tmpfs, memfd, SysV shm). A job cgroup sees all of it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil


@dataclass
class Reading:
    """The whole job at one instant. `cpu` includes processes that already ended; `memory` is the
    cgroup's charge (None without a memory cgroup); `disk` what its work dir holds (None without a
    disk limit)."""

    t: float
    rss: int
    vms: int
    cpu: float
    processes: int
    top_rss_pid: int | None = None
    output: int = 0
    pids: list[int] = field(default_factory=list)
    gpu_memory: int | None = None
    memory: int | None = None
    disk: int | None = None


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

    def children(self, fresh: bool = False) -> dict[int, list[int]]:
        """The table; `fresh` rescans now (a kill loop must see a fork that just happened)."""
        with self._lock:
            now = time.monotonic()
            if fresh or now - self._at > self.max_age:
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
PAGE = os.sysconf("SC_PAGE_SIZE")


def live_thread_memory(pid: int) -> tuple[int, int] | None:
    """(rss, vms) of a zombie thread-group leader through one of its live threads; None when no
    thread lives (a real zombie)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
            if stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X"):
                continue
            with open(f"/proc/{pid}/task/{tid}/statm") as f:
                vms_pages, rss_pages = f.read().split()[:2]
        except (OSError, ValueError):
            continue
        return int(rss_pages) * PAGE, int(vms_pages) * PAGE
    return None


class JobTree:
    """Every process that ever belonged to one job, tracked by (pid, create time) against pid reuse.

    `members` (the job cgroup's process list) adds what the kernel knows to the descendants found
    in the process table: a process the job orphaned stays a member wherever it is re-parented."""

    def __init__(self, root_pid: int, members: Callable[[], list[int]] | None = None, helpers: int = 0,
                 exact: bool = False) -> None:
        """`helpers`: how many of the sandbox's own processes (sandbox.job.namespaces) stand above the
        job, idle, not the job's, so neither measured nor counted (read once, to know them): 2, the
        root (the relay) and its child (the init); 1, the root (the init, when the fork-server is
        the relay); 0, none.
        `exact`: `members` is complete (the job cannot leave its cgroup: it is not root), so the
        process table is not searched at all."""
        self.root_pid, self.helpers, self._exact = root_pid, helpers, exact
        self._helpers: set[int] = {root_pid} if helpers else set()
        self._members = members
        self._procs: dict[int, psutil.Process] = {}
        self._ppid: dict[int, int] = {}
        self._cpu: dict[int, float] = {}  # own + reaped children's CPU at the last reading
        self._lost_cpu = 0.0  # CPU of processes that ended where no tracked process reaped them
        self._last_cpu = 0.0
        self._lock = threading.RLock()  # the monitor reads while a termination thread signals
        self._adopt(root_pid)

    def _adopt(self, pid: int) -> bool:
        try:
            self._procs[pid] = psutil.Process(pid)
            return True
        except psutil.Error:
            return False

    def _discover(self, fresh: bool = False) -> None:
        """Adopt every descendant of a tracked process (one shared /proc scan per tick), or every
        member of the job's cgroup."""
        if self._members is not None:
            for pid in self._members():
                if pid not in self._procs:
                    self._adopt(pid)
            if self._exact:
                return
        children = PROCESS_TABLE.children(fresh)
        # From every tracked process that still exists (a zombie leader has children too); a pid
        # reused by another process fails is_running() (start time) and is not expanded.
        stack = [pid for pid, proc in self._procs.items() if pid in children and proc.is_running()]
        while stack:
            for kid in children.get(stack.pop(), ()):
                if kid not in self._procs and self._adopt(kid):
                    stack.append(kid)

    def alive(self, fresh: bool = False) -> list[psutil.Process]:
        """Tracked processes still running (zombies with live threads included); `fresh`: look
        for new ones with a new /proc scan."""
        with self._lock:
            self._discover(fresh)
            return [p for p in self._procs.values() if _running(p)]

    def read(self) -> Reading:
        """One pass over the tree."""
        with self._lock:
            return self._read()

    def _read(self) -> Reading:
        self._discover()
        rss = vms = 0
        pids, cpu_now, gone = [], {}, []
        top_pid, top_rss = None, -1
        for pid, proc in list(self._procs.items()):
            if pid in self._helpers:
                continue
            try:
                with proc.oneshot():
                    zombie = proc.status() == psutil.STATUS_ZOMBIE
                    times = proc.cpu_times()
                    self._ppid[pid] = proc.ppid()
                    memory = live_thread_memory(pid) if zombie else tuple(proc.memory_info()[:2])
            except psutil.NoSuchProcess:
                gone.append(pid)
                continue
            except psutil.Error:
                continue
            if self.helpers == 2 and self._ppid[pid] == self.root_pid:
                self._helpers.add(pid)  # the init
                continue
            cpu_now[pid] = times.user + times.system + times.children_user + times.children_system
            if memory is None:
                continue  # a real zombie: its CPU is final and stays counted until it is reaped
            pids.append(pid)
            rss += memory[0]
            vms += memory[1]
            if memory[0] > top_rss:
                top_pid, top_rss = pid, memory[0]
        for pid in gone:
            del self._procs[pid]
            if not self._reaped_by_tracked(pid, cpu_now):
                self._lost_cpu += self._cpu.get(pid, 0.0)
            self._cpu.pop(pid, None)
        self._cpu.update(cpu_now)
        self._last_cpu = max(self._last_cpu, self._lost_cpu + sum(cpu_now.values()))
        return Reading(time.monotonic(), rss, vms, self._last_cpu, len(pids), top_pid, pids=pids)

    def _reaped_by_tracked(self, pid: int, readable: dict[int, float]) -> bool:
        """Whether an ended process's CPU now shows in a tracked ancestor's reaped-children time
        (every ancestor up to the job's main process, a subreaper, reaps what it orphans)."""
        seen = set()
        while pid in self._ppid and pid not in seen:
            seen.add(pid)
            pid = self._ppid[pid]
            if pid in readable:
                return True
        return False


def _running(proc: psutil.Process) -> bool:
    try:
        if not proc.is_running():
            return False
        return proc.status() != psutil.STATUS_ZOMBIE or live_thread_memory(proc.pid) is not None
    except psutil.Error:
        return False
