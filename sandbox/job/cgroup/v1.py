"""cgroup v1 (legacy and hybrid hosts): one directory per controller hierarchy.

memory: `memory.limit_in_bytes` (+ `memory.memsw.limit_in_bytes` where swap accounting is on, so no
swap), `memory.max_usage_in_bytes`, `memory.oom_control` `oom_kill`; pids: `pids.max`,
`pids.events` `max`; cpuacct: `cpuacct.usage` (ns); cpu: `cpu.cfs_quota_us`; freezer:
`freezer.state` for a kill without races. v1 has no `memory.oom.group`: after an OOM kill the
supervisor kills the rest of the job itself.
"""

from __future__ import annotations

import os
import time

from .common import (CgroupLimits, CgroupStats, JobCgroup, make_dir, page_floor, parse_procs, read_int,
                     read_keyed, read_text, write)

CONTROLLERS = ("memory", "pids", "cpuacct", "cpu", "freezer")
CFS_PERIOD_US = 100_000


class V1Cgroup(JobCgroup):
    label = "cgroup v1"

    def __init__(self, parents: dict[str, str], name: str, limits: CgroupLimits) -> None:
        """Create `name` under each controller's parent and apply `limits`; on failure nothing is left."""
        super().__init__(limits)
        self.dirs: dict[str, str] = {}
        try:
            for controller, parent in parents.items():
                path = os.path.join(parent, name)
                if path not in self.dirs.values():  # co-mounted controllers (cpu,cpuacct) share one
                    make_dir(path)
                self.dirs[controller] = path
            self._apply(limits)
        except BaseException:
            self.remove()
            raise

    def _apply(self, limits: CgroupLimits) -> None:
        memory = self.dirs.get("memory")
        if memory is not None and limits.memory is not None:
            value = str(page_floor(limits.memory))
            write(f"{memory}/memory.limit_in_bytes", value)
            if os.path.exists(f"{memory}/memory.memsw.limit_in_bytes"):
                write(f"{memory}/memory.memsw.limit_in_bytes", value)
        if "pids" in self.dirs and limits.tasks is not None:
            write(f"{self.dirs['pids']}/pids.max", str(limits.tasks))
        if "cpu" in self.dirs and limits.cpus is not None:
            write(f"{self.dirs['cpu']}/cpu.cfs_period_us", str(CFS_PERIOD_US))
            write(f"{self.dirs['cpu']}/cpu.cfs_quota_us", str(max(1000, int(limits.cpus * CFS_PERIOD_US))))

    def _dirs(self) -> list[str]:
        return list(dict.fromkeys(self.dirs.values()))

    def procs_files(self) -> list[str]:
        return [f"{d}/cgroup.procs" for d in self._dirs()]

    def join_files(self) -> list[str]:
        """`tasks`: writing 0 there moves only the writing thread, without the global threadgroup
        lock whose RCU grace period makes a `cgroup.procs` write cost ~5 ms (so only for a process
        with one thread, which then moves whole)."""
        return [f"{d}/tasks" for d in self._dirs()]

    def pids(self, everywhere: bool = True) -> list[int]:
        members: set[int] = set()
        for d in self._dirs() if everywhere else self._dirs()[:1]:
            try:
                members.update(parse_procs(read_text(f"{d}/cgroup.procs")))
            except FileNotFoundError:
                pass
        return sorted(members)

    def stats(self, peak: bool = True) -> CgroupStats:
        out = CgroupStats()
        memory = self.dirs.get("memory")
        if memory is not None:
            out.memory = read_int(f"{memory}/memory.usage_in_bytes")
            out.memory_peak = read_int(f"{memory}/memory.max_usage_in_bytes") if peak else None
            out.oom_kills = read_keyed(f"{memory}/memory.oom_control").get("oom_kill", 0)
        if "cpuacct" in self.dirs:
            usage = read_int(f"{self.dirs['cpuacct']}/cpuacct.usage")
            out.cpu_seconds = usage / 1e9 if usage is not None else None
        if "pids" in self.dirs:
            out.pids_refused = read_keyed(f"{self.dirs['pids']}/pids.events").get("max", 0)
        return out

    def _kill_atomic(self) -> bool:
        return False

    def _freeze(self, frozen: bool) -> bool:
        freezer = self.dirs.get("freezer")
        if freezer is None or not os.path.exists(f"{freezer}/freezer.state"):
            return False
        state = "FROZEN" if frozen else "THAWED"
        try:
            with open(f"{freezer}/freezer.state", "w") as f:
                f.write(state)
        except OSError:
            return False
        deadline = time.monotonic() + 1.0
        while frozen and read_text(f"{freezer}/freezer.state").strip() != state and time.monotonic() < deadline:
            time.sleep(0.001)  # FREEZING: a task is in the middle of something (a fork completes first)
        return True
