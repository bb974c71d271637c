"""How each limit is enforced for a job on a given arch: hard, watched, unavailable or off.

One table, used for every JobResult (`enforcement`) and by `taichi-sandbox probe`. Facts behind it:
README "Verdicts and enforcement" and ../shared/taichi-facts.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from .limits import Limits


class Enforcement(BaseModel):
    level: Literal["hard", "watched", "unavailable", "off"]
    by: str = ""
    note: str = ""


@dataclass(frozen=True)
class GpuFacts:
    """What the supervisor knows about GPUs on this machine."""

    nvml_error: str | None  # None: NVML works
    mps: bool = False


LIMIT_NAMES = ("cpu_time", "wall_time", "memory", "address_space", "gpu_memory", "processes", "output",
               "open_files", "file_size")


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
