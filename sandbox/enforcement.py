"""How each limit is enforced for a job on a given arch: hard, watched, unavailable or off.

One table, used for every JobResult (`enforcement`) and by `taichi-sandbox probe`. Facts behind it:
README "Verdicts and enforcement" and ../shared/taichi-facts.md.
"""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from .limits import Limits

if TYPE_CHECKING:
    from .gpu import GpuSampler


class Enforcement(BaseModel):
    level: Literal["hard", "watched", "unavailable", "off"]
    by: str = ""
    note: str = ""


@dataclass(frozen=True)
class GpuFacts:
    """What the supervisor knows about GPUs on this machine."""

    nvml_error: str | None  # None: NVML works
    mps: bool = False



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


def enforcement_for(limits: Limits, arch: str, address_space: int | None, gpu: GpuFacts) -> dict[str, Enforcement]:
    """How each limit in `limits` is enforced for one job (limits left unset are 'off')."""
    out = {
        "cpu_time": Enforcement(level="hard", by="RLIMIT_CPU per process; monitor sums the tree"),
        "wall_time": Enforcement(level="watched", by="monitor deadline"),
        "memory": Enforcement(level="watched", by="monitor: RSS of the job tree"),
        "address_space": (Enforcement(level="hard", by="RLIMIT_AS per process") if address_space is not None
                          else Enforcement(level="off", note="CUDA reserves huge virtual ranges" if arch == "cuda"
                                           else "unlimited")),
        "gpu_memory": _gpu_memory(arch, gpu),
        "processes": Enforcement(level="watched", by="monitor (RLIMIT_NPROC does not bind root)"),
        "output": Enforcement(level="watched", by="I/O thread byte count"),
        "open_files": Enforcement(level="hard", by="RLIMIT_NOFILE"),
        "file_size": Enforcement(level="hard", by="RLIMIT_FSIZE"),
    }
    unset = {"cpu_time": limits.cpu_time, "wall_time": limits.wall_time, "memory": limits.memory,
             "gpu_memory": limits.gpu_memory, "processes": limits.max_processes, "output": limits.max_output,
             "open_files": limits.max_open_files, "file_size": limits.max_file_size}
    for name, value in unset.items():
        if value is None and out[name].level != "unavailable":
            out[name] = Enforcement(level="off", note="no limit set")
    return out


PROBED_ARCHS = ("cpu", "cuda", "vulkan", "opengl", "metal")
EVERY_LIMIT = Limits(cpu_time=1, wall_time=1, memory=1 << 30, gpu_memory=1 << 30, max_processes=1, max_output=1,
                     max_open_files=1, max_file_size=1)


def _cgroups() -> str:
    controllers = "/sys/fs/cgroup/cgroup.controllers"
    if not os.path.exists(controllers):
        return "no cgroup v2 hierarchy at /sys/fs/cgroup"
    with open(controllers) as f:
        names = f.read().split()
    writable = "writable" if os.access("/sys/fs/cgroup", os.W_OK) else "not writable"
    return f"cgroup v2 ({' '.join(names) or 'no controllers'}; {writable}); not used by taichi-sandbox yet"


def machine_report(sampler: "GpuSampler") -> dict:
    """Facts about this machine and, for each arch that initialises here, how each limit is enforced."""
    from .gpu import GpuUnavailable, mps_pipe_directory, probe
    from .limits import address_space_for

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
    table = {}
    for arch, found in archs.items():
        if found.usable:
            address_space, _ = address_space_for(EVERY_LIMIT, arch)
            table[arch] = {name: e.model_dump() for name, e in
                           enforcement_for(EVERY_LIMIT, arch, address_space, facts).items()}
    return {
        "taichi": taichi_version,
        "archs": {a: {"usable": p.usable, "detail": p.reason} for a, p in archs.items()},
        "nvml": nvml,
        "mps": {"reachable": mps_dir is not None, "pipe_directory": mps_dir},
        "cgroups": _cgroups(),
        "enforcement": table,
    }
