"""Which cgroups this supervisor can use, decided once: version, mounts, its own cgroup, the
controllers it may write, and the parent directory the sandbox owns under its own cgroup.

The mode is read like systemd does (what is mounted at /sys/fs/cgroup): cgroup2 there is the
unified v2 hierarchy; a tmpfs there (legacy or hybrid) means the v1 controller hierarchies, even
when an empty cgroup2 mount sits at /sys/fs/cgroup/unified.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import dataclasses
from dataclasses import dataclass, field

from . import v1, v2
from .common import CgroupError, CgroupLimits, JobCgroup, read_text, remove_stale

PARENT = "taichi-sandbox"
CGROUP_ROOT = "/sys/fs/cgroup"
# What each controller lets the sandbox enforce, per version (v2 counts CPU without a controller).
ENFORCES = {1: {"memory": "memory", "pids": "processes", "cpuacct": "cpu_time", "cpu": "cpu_threads"},
            2: {"memory": "memory", "pids": "processes", "cpu": "cpu_threads"}}
NO_DELEGATION = "no writable cgroup: not root and no delegation"


@dataclass(frozen=True)
class Mount:
    point: str
    root: str
    fstype: str
    options: frozenset[str]


def parse_mountinfo(text: str) -> list[Mount]:
    """cgroup and cgroup2 mounts from /proc/self/mountinfo."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(Mount(unescape_mountinfo(fields[4]), unescape_mountinfo(fields[3]), tail[0],
                            frozenset(tail[2].split(","))))
    return mounts


def unescape_mountinfo(field: str) -> str:
    """A mountinfo path: mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/self/cgroup → controller name → cgroup path ('' is the v2 entry)."""
    out = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for name in parts[1].split(",") if parts[1] else [""]:
                out[name] = parts[2]
    return out


def _within(mount: Mount, path: str) -> str | None:
    """Directory of cgroup `path` in `mount`, or None when the mount does not show it (a path with
    '..' lies outside this cgroup namespace)."""
    if "/.." in path:
        return None
    if mount.root == "/":
        return mount.point + (path if path != "/" else "")
    if path == mount.root or path.startswith(mount.root + "/"):
        return mount.point + path[len(mount.root):]
    return None


@dataclass(frozen=True)
class CgroupHost:
    """The cgroup mechanism chosen for this supervisor. `version` None: polling only, `reason` says why."""

    version: int | None = None
    parents: dict[str, str] = field(default_factory=dict)  # controller → parent dir (v2: all the same)
    root: str = ""  # v2: the parent directory, used even with no controller enabled
    reason: str = ""  # why cgroups, or some controllers, are not used
    dmem: bool = False  # the device-memory controller exists (reported only)

    @property
    def label(self) -> str:
        return f"cgroup v{self.version}" if self.version else "polling"

    def enforces(self) -> frozenset[str]:
        """Limits the kernel enforces or counts here: memory, processes, cpu_time, cpu_threads."""
        if self.version is None:
            return frozenset()
        found = {ENFORCES[self.version][c] for c in self.parents if c in ENFORCES[self.version]}
        return frozenset(found | ({"cpu_time"} if self.version == 2 else set()))

    def kill_method(self) -> str:
        if self.version == 2:
            return "cgroup.kill" if os.path.exists(f"{self.root}/cgroup.kill") else "cgroup.freeze, then SIGKILL"
        if self.version == 1:
            return "freezer, then SIGKILL" if "freezer" in self.parents else "SIGKILL until the cgroup is empty"
        return "SIGSTOP the polled tree until no new process appears, then SIGKILL"

    def create(self, job_id: str, limits: CgroupLimits) -> JobCgroup:
        """A fresh cgroup for one job (raises CgroupError)."""
        name = f"job-{re.sub(r'[^A-Za-z0-9_.-]', '_', job_id)[:64]}-{secrets.token_hex(3)}"
        if self.version == 1:
            return v1.V1Cgroup(self.parents, name, limits)
        if self.version == 2:
            return v2.V2Cgroup(self.root, frozenset(self.parents), name, limits)
        raise CgroupError(f"cgroups unavailable: {self.reason}")


def discover(mode: str = "auto") -> CgroupHost:
    """The host's cgroups as this process may use them, with the sandbox's parents created.
    `mode` 'off' uses none. Never raises: what cannot be used is named in `reason`."""
    if mode == "off":
        return CgroupHost(reason='off by policy ([sandbox] cgroups = "off")')
    try:
        mounts = parse_mountinfo(read_text("/proc/self/mountinfo"))
        own = parse_proc_cgroup(read_text("/proc/self/cgroup"))
    except OSError as err:
        return CgroupHost(reason=f"cannot read this process's cgroups: {err.strerror}")
    dmem = any("dmem" in _controllers(m.point) for m in mounts if m.fstype == "cgroup2")
    chosen = select_hierarchy(mounts)
    if chosen is None:
        return CgroupHost(reason="no cgroup hierarchy is mounted", dmem=dmem)
    version, found = chosen
    host = host_v2(found[0], own.get("", "/")) if version == 2 else host_v1(found, own)
    return dataclasses.replace(host, dmem=dmem)


def select_hierarchy(mounts: list[Mount]) -> tuple[int, list[Mount]] | None:
    """(2, [the unified mount]) or (1, [the v1 controller mounts]), as systemd decides: by what is
    mounted at /sys/fs/cgroup."""
    at_root = [m for m in mounts if m.point == CGROUP_ROOT]
    unified = [m for m in mounts if m.fstype == "cgroup2"]
    if at_root and at_root[-1].fstype == "cgroup2":
        return 2, at_root[-1:]
    legacy = [m for m in mounts if m.fstype == "cgroup" and m.options & set(v1.CONTROLLERS)]
    if legacy:
        return 1, legacy
    return (2, unified[:1]) if unified else None


def _controllers(mount_point: str) -> set[str]:
    try:
        return set(read_text(f"{mount_point}/cgroup.controllers").split())
    except OSError:
        return set()


def _why_not(path: str, err: OSError | None = None) -> str:
    """Why `path` cannot be written, in the words `probe` and the job's notes use."""
    if (err is not None and err.errno == errno.EROFS) or os.statvfs(path).f_flag & os.ST_RDONLY:
        return "no writable cgroup: the cgroup filesystem is mounted read-only"
    if os.geteuid() != 0:
        return f"{NO_DELEGATION} (uid {os.geteuid()})"
    return f"no writable cgroup: {err.strerror if err else 'permission denied'}"


def _grouped(problems: dict[str, str]) -> str:
    """'reason (controllers); ...' from controller -> reason."""
    by_reason: dict[str, list[str]] = {}
    for controller, reason in problems.items():
        by_reason.setdefault(reason, []).append(controller)
    return "; ".join(f"{reason} ({', '.join(names)})" for reason, names in by_reason.items())


def host_v1(mounts: list[Mount], own: dict[str, str]) -> CgroupHost:
    """The v1 controllers this process can create job cgroups under."""
    parents, problems = {}, {}
    for controller in v1.CONTROLLERS:
        mount = next((m for m in mounts if controller in m.options), None)
        where = _within(mount, own.get(controller, "/")) if mount is not None else None
        if where is None:
            problems[controller] = "not mounted where this process can see its cgroup"
            continue
        parent = f"{where}/{PARENT}"
        try:
            os.mkdir(parent)
        except FileExistsError:
            pass
        except OSError as err:
            problems[controller] = _why_not(where, err)
            continue
        if not os.access(parent, os.W_OK):
            problems[controller] = _why_not(parent)
            continue
        remove_stale(parent)
        parents[controller] = parent
    return CgroupHost(1 if parents else None, parents, reason=_grouped(problems))


def host_v2(mount: Mount, own_path: str) -> CgroupHost:
    """The v2 subtree this process can create job cgroups under (see v2.prepare_parent)."""
    where = _within(mount, own_path)
    if where is None:
        return CgroupHost(reason=f"this process's cgroup {own_path} is not visible under {mount.point}")
    if not os.access(f"{where}/cgroup.procs", os.W_OK) or not os.access(where, os.W_OK):
        return CgroupHost(reason=_why_not(where))
    try:
        parent, enabled = v2.prepare_parent(where, is_root=where == mount.point)
    except CgroupError as err:
        return CgroupHost(reason=f"no usable cgroup v2 subtree: {err}")
    remove_stale(parent)
    missing = [c for c in v2.CONTROLLERS if c not in enabled]
    reason = f"controllers not available to {where}: {', '.join(missing)}" if missing else ""
    return CgroupHost(2, {c: parent for c in enabled}, parent, reason)
