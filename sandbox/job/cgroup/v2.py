"""cgroup v2 (unified hierarchy; root, or a subtree delegated to the supervisor).

Job files: `memory.max`, `memory.swap.max = 0`, `memory.oom.group = 1` (the kernel kills the whole
job on OOM), `memory.peak` (Linux ≥ 5.19), `memory.events` `oom_kill`, `pids.max`, `pids.events`
`max`, `cpu.max`, `cpu.stat` `usage_usec` (present without the cpu controller), `cgroup.kill`
(Linux ≥ 5.14), else `cgroup.freeze`.

The parent follows systemd's delegation rules: no processes in inner nodes, so when the
supervisor's own cgroup holds processes and is not the root, they move into a leaf
`<own>/tsbx-supervisor` before controllers are enabled for `<own>/taichi-sandbox`.
"""

from __future__ import annotations

import errno
import os
import time

from .common import (CgroupError, CgroupLimits, CgroupStats, JobCgroup, make_dir, page_floor, parse_procs,
                     read_int, read_keyed, read_text, write, write_pid)

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
PARENT = "taichi-sandbox"
SUPERVISOR_LEAF = "tsbx-supervisor"


def enable(path: str, controllers: tuple[str, ...]) -> set[str]:
    """Enable `controllers` for the children of `path` (one at a time, so one refusal does not stop
    the others); returns what is enabled. EBUSY (processes in `path`) is raised to the caller."""
    for name in controllers:
        try:
            with open(f"{path}/cgroup.subtree_control", "w") as f:
                f.write(f"+{name}")
        except OSError as err:
            if err.errno == errno.EBUSY:
                raise
    return set(read_text(f"{path}/cgroup.subtree_control").split())


def prepare_parent(own: str, is_root: bool, controllers: tuple[str, ...] = CONTROLLERS) -> tuple[str, frozenset[str]]:
    """Make `<own>/taichi-sandbox` with every available one of `controllers` enabled for its
    children. Returns (parent directory, enabled controllers)."""
    available = set(read_text(f"{own}/cgroup.controllers").split())
    wanted = tuple(c for c in controllers if c in available)
    try:
        enable(own, wanted)
    except OSError as err:
        if err.errno != errno.EBUSY or is_root:
            raise CgroupError(f"cannot enable controllers in {own}: {err.strerror}") from None
        leaf = f"{own}/{SUPERVISOR_LEAF}"
        make_dir(leaf)
        for pid in parse_procs(read_text(f"{own}/cgroup.procs")):
            try:
                write_pid(f"{leaf}/cgroup.procs", pid)
            except CgroupError:
                if os.path.exists(f"/proc/{pid}"):
                    raise
        try:
            enable(own, wanted)
        except OSError as err2:
            raise CgroupError(f"cannot enable controllers in {own}: {err2.strerror}") from None
    parent = f"{own}/{PARENT}"
    make_dir(parent)
    try:
        enabled = enable(parent, wanted)
    except OSError as err:
        raise CgroupError(f"cannot enable controllers in {parent}: {err.strerror}") from None
    return parent, frozenset(enabled)


class V2Cgroup(JobCgroup):
    label = "cgroup v2"

    def __init__(self, parent: str, controllers: frozenset[str], name: str, limits: CgroupLimits) -> None:
        """Create `<parent>/<name>` and apply `limits` with the `controllers` the parent enabled;
        on failure nothing is left."""
        super().__init__(limits)
        self.dir, self.controllers = f"{parent}/{name}", controllers
        make_dir(self.dir)
        try:
            self._apply(limits)
        except BaseException:
            self.remove()
            raise

    def _apply(self, limits: CgroupLimits) -> None:
        if "memory" in self.controllers and limits.memory is not None:
            write(f"{self.dir}/memory.max", str(page_floor(limits.memory)))
            if os.path.exists(f"{self.dir}/memory.swap.max"):
                write(f"{self.dir}/memory.swap.max", "0")
            if os.path.exists(f"{self.dir}/memory.oom.group"):
                write(f"{self.dir}/memory.oom.group", "1")
        if "pids" in self.controllers and limits.tasks is not None:
            write(f"{self.dir}/pids.max", str(limits.tasks))
        if "cpu" in self.controllers and limits.cpus is not None:
            write(f"{self.dir}/cpu.max", f"{max(1000, int(limits.cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}")

    def _dirs(self) -> list[str]:
        return [self.dir]

    def procs_files(self) -> list[str]:
        return [f"{self.dir}/cgroup.procs"]

    def join_files(self) -> list[str]:
        return self.procs_files()  # cgroup.threads is only for threaded cgroups

    def pids(self, everywhere: bool = True) -> list[int]:
        try:
            return parse_procs(read_text(f"{self.dir}/cgroup.procs"))
        except FileNotFoundError:
            return []

    def stats(self, peak: bool = True) -> CgroupStats:
        return stats_from(self.dir, self.controllers, peak)

    def _kill_atomic(self) -> bool:
        try:
            with open(f"{self.dir}/cgroup.kill", "w") as f:
                f.write("1")
        except OSError:  # Linux < 5.14 has no cgroup.kill
            return False
        return True

    def _freeze(self, frozen: bool) -> bool:
        try:
            with open(f"{self.dir}/cgroup.freeze", "w") as f:
                f.write("1" if frozen else "0")
        except OSError:
            return False
        deadline = time.monotonic() + 1.0
        while frozen and read_keyed(f"{self.dir}/cgroup.events").get("frozen") != 1 \
                and time.monotonic() < deadline:
            time.sleep(0.001)
        return True


def stats_from(path: str, controllers: frozenset[str], peak: bool = True) -> CgroupStats:
    """One reading of the v2 cgroup at `path` (also what tests feed captured files through)."""
    out = CgroupStats()
    cpu = read_keyed(f"{path}/cpu.stat")
    if "usage_usec" in cpu:
        out.cpu_seconds = cpu["usage_usec"] / 1e6
    if "memory" in controllers:
        out.memory = read_int(f"{path}/memory.current")
        out.memory_peak = read_int(f"{path}/memory.peak") if peak else None
        events = read_keyed(f"{path}/memory.events")
        out.oom_kills, out.limit_hits = events.get("oom_kill", 0), events.get("oom", 0)
    if "pids" in controllers:
        out.pids_refused = read_keyed(f"{path}/pids.events").get("max", 0)
    return out
