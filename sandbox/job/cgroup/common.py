"""What both cgroup versions share: a job cgroup's limits, its stats, its verbs, and file helpers.

Lifecycle of one job cgroup (the same verbs for v1 and v2):
    host.create(name, limits) → the child joins through every `join_files()` before running job
    code → `stats()` every poll → `signal(SIGTERM)` / `kill()` (atomic) → `remove()` after the verdict.
Counters are never reset: every job gets a fresh cgroup.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

PAGE = os.sysconf("SC_PAGE_SIZE")
# pids.max counts tasks (threads too). A job's own processes are bounded exactly by the monitor
# (`max_processes`, counted from cgroup membership); pids.max is the kernel's hard stop for fork
# storms, so it leaves room for Taichi's and the drivers' threads: 2 per CPU thread + this many.
TASK_HEADROOM = 64


class CgroupError(RuntimeError):
    """A cgroup could not be created, configured or read. The message is one line."""


@dataclass(frozen=True)
class CgroupLimits:
    """What the kernel enforces for one job. None: not limited."""

    memory: int | None = None  # bytes; swap is never allowed on top
    tasks: int | None = None  # pids.max
    cpus: float | None = None  # CPU bandwidth in cores (cpu.max / cpu.cfs_quota_us)


def task_limit(max_processes: int | None, cpu_threads: int) -> int | None:
    """pids.max for a job allowed `max_processes` processes using `cpu_threads` Taichi threads."""
    return None if max_processes is None else max_processes + 2 * cpu_threads + TASK_HEADROOM


@dataclass
class CgroupStats:
    """One reading of a job cgroup; None where the controller is not in use."""

    memory: int | None = None  # bytes charged now (anon, page cache, tmpfs, memfd, shm, kernel)
    memory_peak: int | None = None
    cpu_seconds: float | None = None  # whole tree, reaped children included
    oom_kills: int = 0  # processes of the job the kernel OOM-killed, whichever limit (or the host) ran out
    limit_hits: int = 0  # v2 memory.events `oom`: OOMs at the job's own limit (v1 has no such counter)
    pids_refused: int = 0  # forks and clones refused at pids.max


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def read_int(path: str) -> int | None:
    """An integer file; None when it does not exist or reads 'max'."""
    try:
        value = read_text(path).strip()
    except FileNotFoundError:
        return None
    return None if value == "max" else int(value)


def parse_keyed(text: str) -> dict[str, int]:
    """'key value' lines (memory.events, cpu.stat, pids.events, memory.oom_control) → dict."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def read_keyed(path: str) -> dict[str, int]:
    try:
        return parse_keyed(read_text(path))
    except FileNotFoundError:
        return {}


def write(path: str, value: str) -> None:
    """Write a cgroup file and read it back (systemd's lesson: a limit can be silently ignored)."""
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as err:
        raise CgroupError(f"cannot write {value!r} to {path}: {err.strerror}") from None
    got = read_text(path).strip()
    if got != value:
        raise CgroupError(f"{path} reads {got!r} after writing {value!r}")


def page_floor(size: int) -> int:
    """The kernel keeps memory limits in whole pages."""
    return max(PAGE, size - size % PAGE)


def parse_procs(text: str) -> list[int]:
    return [int(line) for line in text.split()]


class JobCgroup(ABC):
    """One job's cgroup. Subclasses provide the version-specific files; the verbs live here."""

    label: str  # "cgroup v1" / "cgroup v2"

    def __init__(self, limits: CgroupLimits) -> None:
        self.limits = limits

    @abstractmethod
    def procs_files(self) -> list[str]:
        """The `cgroup.procs` files (one per hierarchy on v1): a pid written there moves its process."""

    @abstractmethod
    def join_files(self) -> list[str]:
        """Where a single-threaded process writes "0" to move itself in, at the least cost."""

    @abstractmethod
    def pids(self, everywhere: bool = True) -> list[int]:
        """Every process in the cgroup now (exited processes leave it at once, zombies included).
        On v1 `everywhere` reads every hierarchy (a root job could leave some); else one, for the
        monitor's every tick."""

    @abstractmethod
    def stats(self, peak: bool = True) -> CgroupStats:
        """One reading of the kernel's counters; `peak` False skips the peak (the monitor keeps the
        largest reading itself; the verdict reads the kernel's)."""

    @abstractmethod
    def _kill_atomic(self) -> bool:
        """SIGKILL the whole cgroup in one step (cgroup.kill); False where the kernel cannot."""

    @abstractmethod
    def _freeze(self, frozen: bool) -> bool:
        """Freeze (no task runs or forks) or thaw the cgroup; False where there is no freezer."""

    @abstractmethod
    def _dirs(self) -> list[str]:
        """Every directory this cgroup consists of, removed by `remove()`."""

    @property
    def path(self) -> str:
        return self._dirs()[0]

    def join(self, pid: int) -> None:
        """Move `pid` in (the supervisor side of what the child does for itself)."""
        for path in self.procs_files():
            write_pid(path, pid)

    def signal(self, sig: int) -> list[int]:
        """Send `sig` to every member (not atomic: for SIGTERM; use `kill()` to end the job)."""
        hit = []
        for pid in self.pids():
            try:
                os.kill(pid, sig)
                hit.append(pid)
            except OSError:  # gone, or not ours to signal (it then stays, and remove() says so)
                pass
        return hit

    def kill(self, timeout: float = 2.0) -> list[int]:
        """SIGKILL every process of the job with no way out: cgroup.kill, else freeze → kill →
        thaw, else kill until empty. Returns the pids that were members; waits (up to `timeout`)
        until the cgroup is empty."""
        victims = self.pids()
        if not victims:
            return []
        if not self._kill_atomic():
            frozen = self._freeze(True)
            try:
                victims = sorted(set(victims) | set(self.signal(signal.SIGKILL)))
            finally:
                if frozen:
                    self._freeze(False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            left = self.pids()
            if not left:
                break
            victims = sorted(set(victims) | set(self.signal(signal.SIGKILL)))  # a fork that raced us
            time.sleep(0.001)
        return victims

    def remove(self, timeout: float = 2.0) -> str | None:
        """Kill what is left and remove the cgroup; a one-line problem, or None when it is gone."""
        self.kill(timeout)
        problems = []
        for path in reversed(self._dirs()):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                problems.append(f"{path}: {err.strerror}")
        return f"cgroup not removed: {'; '.join(problems)}" if problems else None


def write_pid(path: str, pid: int) -> None:
    """Move `pid` into the cgroup whose `cgroup.procs` is `path`."""
    try:
        with open(path, "w") as f:
            f.write(str(pid))
    except OSError as err:
        raise CgroupError(f"cannot move pid {pid} into {os.path.dirname(path)}: {err.strerror}") from None


def make_dir(path: str) -> None:
    """mkdir; an existing directory is fine."""
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    except OSError as err:
        raise CgroupError(f"cannot create {path}: {err.strerror}") from None


def remove_stale(parent: str, older_than: float = 60.0) -> None:
    """Remove empty job cgroups a killed supervisor left under `parent` (populated ones stay:
    rmdir refuses them; young ones may be a starting job of another supervisor)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    now = time.time()
    for name in names:
        path = os.path.join(parent, name)
        try:
            if name.startswith("job-") and now - os.stat(path).st_mtime > older_than:
                os.rmdir(path)
        except OSError as err:
            if err.errno not in (errno.EBUSY, errno.ENOENT, errno.ENOTDIR, errno.ENOTEMPTY):
                raise
