"""How each limit is enforced for a job on a given arch: hard, watched, unavailable or off.

One table, used for every JobResult (`enforcement`) and by `taichi-sandbox probe`. Facts behind it:
docs/containment.md (which caps are hard, per arch, with the public sources).
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.limits import Limits
from ..core.models import Enforcement
from ..job.syscalls import describe as describe_syscall_filter

if TYPE_CHECKING:
    from ..job.cgroup import CgroupHost
    from .gpu import GpuSampler


@dataclass(frozen=True)
class GpuFacts:
    """What the supervisor knows about GPUs on this machine."""

    nvml_error: str | None  # None: NVML works
    mps: bool = False


@dataclass(frozen=True)
class CgroupFacts:
    """What a job's cgroup enforces: `label` 'cgroup v1'/'cgroup v2' (None: polling only), the
    limits it `enforces` (memory, processes, cpu_time, cpu_threads), and why the rest is polled."""

    label: str | None = None
    enforces: frozenset[str] = frozenset()
    reason: str = ""


@dataclass(frozen=True)
class IsolationFacts:
    """Whether the job got its own namespaces (`reason`: why not) and network, and the uid it runs
    as when that is its tenant's own (`tenant_uid`, e.g. "uid 60001"; else `shared_uid` says why not)."""

    namespaces: bool = False
    network: str = "none"
    reason: str = ""
    shared_uid: str = "not requested"
    tenant_uid: str = ""
    user_namespace: bool = False  # inside a user namespace of its own (a supervisor that is not root)
    read_only: bool = False  # the filesystem beyond its own dirs is read-only ([sandbox] rootfs)
    syscall_filter: str = "off"  # "hard": its system calls are filtered (sandbox.job.syscalls); else "off" or
    syscalls_note: str = "not requested"  # "unavailable", and why


@dataclass(frozen=True)
class DiskFacts:
    """How a job's disk limit is held: `image` the size in bytes of its own filesystem image (None:
    polled), `reason` why it has none."""

    image: int | None = None
    reason: str = "not requested"


def _disk(facts: DiskFacts) -> Enforcement:
    counted = ("its work dir (HOME, TMPDIR, its cache writes): each file's blocks, or 16 KiB per file when more; "
               "outputs copied back are capped at the limit; /tmp, /var/tmp and /dev/shm are tmpfs counted as memory")
    if facts.image is not None:
        return Enforcement(level="hard", by=f"a filesystem image of its own ({facts.image / (1 << 20):.1f} MiB, "
                           "ext4 on a loop device) mounted at its work dir: writes past the limit fail with ENOSPC; "
                           "statvfs every poll ends a job that reached it", note=counted)
    return Enforcement(level="watched", by="polling: the work dir walked from descriptors, SIGKILL at the limit",
                       note=f"{facts.reason}: a job writes on until the next poll; {counted}")


def _isolation(facts: IsolationFacts) -> dict[str, Enforcement]:
    if facts.namespaces:
        net = "net (none: loopback only)" if facts.network == "none" else "the host network (network = \"host\")"
        user = "user (the supervisor's uid alone, no capabilities), " if facts.user_namespace else ""
        rest = "; the rest read-only" if facts.read_only else ""
        spaces = Enforcement(level="hard", by=f"namespaces: {user}pid (own /proc; nothing outside can be named), "
                             f"mount (private /tmp, /var/tmp and /dev/shm{rest}), ipc, uts, {net}")
    else:
        spaces = Enforcement(level="unavailable", note=f"{facts.reason}: the job sees and can signal the "
                             "supervisor's processes and keeps /dev/shm and SysV objects after it ends")
    if facts.tenant_uid:
        uid = Enforcement(level="hard", by=f"{facts.tenant_uid}, the tenant's own: no supplementary groups, no "
                          "capabilities, no_new_privs; its tenant's kept kernels it may only read, other tenants' "
                          "caches and the audit log not at all")
    else:
        uid = Enforcement(level="unavailable", note=f"{facts.shared_uid}: jobs can read and write what that uid "
                          "can (other tenants' caches, the audit log)")
    if facts.syscall_filter == "hard":
        filtered = Enforcement(level="hard", by=describe_syscall_filter())
    else:
        filtered = Enforcement(level=facts.syscall_filter, note=f"{facts.syscalls_note}: the job may create user "
                               "namespaces (kernel memory outside its limits), keep keys in its uid's keyring for its "
                               "next job, and reach bpf, perf events, userfaultfd and io_uring")
    return {"namespaces": spaces, "tenant_isolation": uid, "syscalls": filtered}


def cgroup_facts(host: "CgroupHost") -> CgroupFacts:
    return CgroupFacts(host.label if host.version else None, host.enforces(), host.reason)


def _polled(what: str, cgroup: CgroupFacts, hole: str = "") -> Enforcement:
    why = cgroup.reason or "no job cgroup"
    return Enforcement(level="watched", by=f"polling: {what}", note=f"{why}{hole}")


def _kernel(limit: str, cgroup: CgroupFacts) -> Enforcement:
    """How the job cgroup enforces `limit`, or the polled fallback with the reason."""
    label = cgroup.label
    if limit == "cpu_time":
        if limit in cgroup.enforces:
            return Enforcement(level="hard", by=f"{label} CPU counter of the whole job (reaped children included), "
                               "checked every poll; RLIMIT_CPU per process")
        return _polled("CPU of the tree from /proc (reaped children via cutime/cstime); RLIMIT_CPU per process",
                       cgroup)
    if limit == "memory":
        if limit in cgroup.enforces:
            v1 = "; v1 has no memory.oom.group: the supervisor kills the rest of the job" \
                if label == "cgroup v1" else ""
            return Enforcement(level="hard", by=f"{label} memory limit, no swap: the kernel OOM-kills at the limit",
                               note=f"counts RSS, page cache, tmpfs, memfd and SysV shm{v1}")
        return _polled("RSS of the job tree", cgroup, "; memory outside RSS (tmpfs, memfd, SysV shm) is not counted")
    if limit == "processes":
        if limit in cgroup.enforces:
            return Enforcement(level="hard", by=f"{label} pids.max (fork fails with EAGAIN); processes counted "
                               "from cgroup membership", note="pids.max counts threads: max_processes + "
                               "2 x cpu_threads + 64 tasks")
        return _polled("processes of the tree (not RLIMIT_NPROC: it counts every process of the uid, not the "
                       "job's)", cgroup)
    if limit in cgroup.enforces:  # cpu_threads
        return Enforcement(level="hard", by=f"{label} CPU bandwidth of cpu_threads cores; Taichi "
                           "cpu_max_num_threads clamped")
    return Enforcement(level="unavailable", by="Taichi cpu_max_num_threads clamped (a job can start more threads)",
                       note=cgroup.reason or "no cpu cgroup controller")



def _gpu_memory(arch: str, gpu: GpuFacts) -> Enforcement:
    if arch == "cpu":
        return Enforcement(level="off", note="arch cpu allocates no device memory")
    nvml = "NVML watchdog in the supervisor sums the job's processes"
    if arch == "cuda":
        if gpu.mps:
            return Enforcement(level="hard", by="NVIDIA MPS CUDA_MPS_PINNED_DEVICE_MEM_LIMIT; " + nvml)
        if gpu.nvml_error is None:
            return Enforcement(level="watched", by=nvml, note="Taichi device_memory_GB caps only sparse SNodes "
                               "on CUDA with memory pools; dense fields and ndarrays are not capped")
        return Enforcement(level="unavailable", note=f"{gpu.nvml_error}; Taichi device_memory_GB caps only "
                           "sparse SNodes on CUDA with memory pools")
    if gpu.nvml_error is None:
        return Enforcement(level="watched", by=nvml, note=f"Taichi ignores device_memory_GB on {arch}")
    software = "; a software driver (lavapipe) keeps device memory in host RAM, where `memory` and " \
               "RLIMIT_AS bound it" if arch == "vulkan" else ""
    return Enforcement(level="unavailable",
                       note=f"{gpu.nvml_error}; Taichi ignores device_memory_GB on {arch}{software}")


def enforcement_for(limits: Limits, arch: str, address_space: int | None, gpu: GpuFacts,
                    cgroup: CgroupFacts = CgroupFacts(),
                    isolation: IsolationFacts = IsolationFacts(reason="not requested"),
                    disk: DiskFacts = DiskFacts()) -> dict[str, Enforcement]:
    """How each limit in `limits` is enforced for one job (limits left unset are 'off')."""
    out = {
        "cpu_time": _kernel("cpu_time", cgroup),
        "wall_time": Enforcement(level="watched", by="monitor deadline"),
        "memory": _kernel("memory", cgroup),
        "address_space": (Enforcement(level="hard", by="RLIMIT_AS per process") if address_space is not None
                          else Enforcement(level="off", note="CUDA reserves huge virtual ranges" if arch == "cuda"
                                           else "unlimited")),
        "gpu_memory": _gpu_memory(arch, gpu),
        "processes": _kernel("processes", cgroup),
        "cpu_threads": _kernel("cpu_threads", cgroup),
        "output": Enforcement(level="watched", by="I/O thread byte count"),
        "open_files": Enforcement(level="hard", by="RLIMIT_NOFILE"),
        "file_size": Enforcement(level="hard", by="RLIMIT_FSIZE"),
        "result": Enforcement(level="hard", by="the supervisor reads at most max_result bytes of result files"),
        "disk": _disk(disk),
    }
    unset = {"cpu_time": limits.cpu_time, "wall_time": limits.wall_time, "memory": limits.memory,
             "gpu_memory": limits.gpu_memory, "processes": limits.max_processes, "cpu_threads": limits.cpu_threads,
             "output": limits.max_output,
             "open_files": limits.max_open_files, "file_size": limits.max_file_size, "result": limits.max_result,
             "disk": limits.disk}
    for name, value in unset.items():
        if value is None and out[name].level != "unavailable":
            out[name] = Enforcement(level="off", note="no limit set")
    return {**out, **_isolation(isolation)}


RLIMIT_HELD = {"cpu_time": "RLIMIT_CPU", "address_space": "RLIMIT_AS", "open_files": "RLIMIT_NOFILE",
               "file_size": "RLIMIT_FSIZE"}
_OFF = Enforcement(level="off")


def headline(table: dict[str, Enforcement]) -> str:
    """One line for a job's summary, from its `enforcement` table: which of its limits are only
    polled and why, what holds the rest (its cgroup, rlimits, a disk image, MPS), and its isolation."""
    def held(name: str, prefix: str, level: str = "hard") -> bool:
        return table.get(name, _OFF).level == level and table[name].by.startswith(prefix)
    parts = []
    polled = [n for n in table if n != "disk" and held(n, "polling:", "watched")]
    if polled:
        parts.append(f"limits polled ({', '.join(polled)}) — {table[polled[0]].note.split(';')[0]}")
    cgroup = [n for n in table if held(n, "cgroup ")]
    mechanisms = [f"{table[cgroup[0]].by[:len('cgroup v1')]} ({', '.join(cgroup)})"] if cgroup else []
    mechanisms += [rlimit for name, rlimit in RLIMIT_HELD.items() if rlimit in table.get(name, _OFF).by]
    mechanisms += ["a disk image"] * held("disk", "a filesystem image") + ["MPS"] * held("gpu_memory", "NVIDIA MPS")
    if mechanisms:
        parts.append("enforced by " + " + ".join(mechanisms))
    if held("disk", "polling:", "watched"):
        parts.append(f"disk polled — {table['disk'].note.split(':')[0]}")
    isolation = [what for name, what in (("namespaces", "namespaces"), ("tenant_isolation", "its tenant's uid"),
                                         ("syscalls", "seccomp")) if table.get(name, _OFF).level == "hard"]
    if "user (" in table.get("namespaces", _OFF).by:
        isolation[0] = "namespaces (user)"
    parts.append("isolated by " + ", ".join(isolation) if isolation else "not isolated")
    return "; ".join(parts)


PROBED_ARCHS = ("cpu", "cuda", "vulkan", "opengl", "metal")
EVERY_LIMIT = Limits(cpu_time=1, wall_time=1, memory=1 << 30, gpu_memory=1 << 30, max_processes=1, max_output=1,
                     max_open_files=1, max_file_size=1, cpu_threads=1, disk=1 << 30)


def cgroup_report(host: "CgroupHost") -> dict:
    """The cgroup mechanism jobs get here, for `probe`."""
    return {"mechanism": host.label, "parents": sorted(set(host.parents.values()) | ({host.root} - {""})),
            "enforces": sorted(host.enforces()), "kill": host.kill_method(), "reason": host.reason,
            "dmem": host.dmem}


def machine_report(sampler: "GpuSampler") -> dict:
    """Facts about this machine and, for each arch that initialises here, how each limit is enforced."""
    from ..core.limits import address_space_for
    from ..job.cgroup import discover
    from ..job.disk import probe as probe_disk
    from .gpu import GpuUnavailable, mps_pipe_directory, probe

    try:
        taichi_version = importlib.metadata.version("taichi")
    except importlib.metadata.PackageNotFoundError:
        taichi_version = None
    archs = {arch: probe(arch) for arch in PROBED_ARCHS}
    try:
        sampler.open()
        nvml = {"available": True, "driver": sampler.driver(),
                "devices": [vars(d) for d in sampler.devices()]}
        nvml_error = None
    except GpuUnavailable as err:
        nvml_error = str(err)
        nvml = {"available": False, "reason": nvml_error, "devices": []}
    mps_dir = mps_pipe_directory(dict(os.environ))
    facts = GpuFacts(nvml_error=nvml_error, mps=mps_dir is not None)
    host = discover()
    from ..job.namespaces import probe as probe_namespaces
    no_namespaces = probe_namespaces()
    from ..job.syscalls import unavailable as no_syscall_filter
    unfiltered = no_syscall_filter()
    root = os.geteuid() == 0
    isolation = IsolationFacts(no_namespaces is None, "none", no_namespaces or "",
                               "jobs run as the supervisor's uid (not root)" if not root else
                               f"jobs would run as root ({no_namespaces}): rejected unless allow_root",
                               "each tenant's own uid ([sandbox] uid_range, or run_as)"
                               if root and no_namespaces is None else "", user_namespace=not root,
                               syscall_filter="unavailable" if unfiltered else "hard", syscalls_note=unfiltered or "")
    no_images = probe_disk()
    disk = DiskFacts(EVERY_LIMIT.disk if no_images is None else None, no_images or "")
    table = {}
    for arch, found in archs.items():
        if found.usable:
            address_space, _ = address_space_for(EVERY_LIMIT, arch)
            table[arch] = {name: e.model_dump() for name, e in
                           enforcement_for(EVERY_LIMIT, arch, address_space, facts, cgroup_facts(host),
                                                           isolation, disk).items()}
    return {
        "taichi": taichi_version,
        "archs": {a: {"usable": p.usable, "detail": p.reason} for a, p in archs.items()},
        "nvml": nvml,
        "mps": {"reachable": mps_dir is not None, "pipe_directory": mps_dir},
        "cgroups": cgroup_report(host),
        "namespaces": {"available": no_namespaces is None, "reason": no_namespaces or ""},
        "syscall_filter": {"available": unfiltered is None, "reason": unfiltered or ""},
        "disk": {"images": no_images is None, "reason": no_images or ""},
        "enforcement": table,
    }
