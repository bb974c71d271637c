"""How a job's limits map onto a Ray task's `.options()`.

| sandbox                | Ray option       | note                                                      |
| ---------------------- | ---------------- | --------------------------------------------------------- |
| `cpu_threads` (else 1) | `num_cpus`       | also clamps Taichi's `cpu_max_num_threads`                |
| `gpu_memory`           | `num_gpus`       | fraction of the device (fractional limits as given, bytes ÷ `device_memory`); non-CPU arch without a limit: 1 |
| `memory`               | `memory`         | placement only: Ray never enforces it; the sandbox does   |
| -                      | `max_retries=0`  | a violated limit is a verdict, not a reason to run again  |
"""

from __future__ import annotations

import math
from typing import Any

from ..core.limits import Limits
from ..core.models import JobSpec


def _ray():
    try:
        import ray
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("taichi-sandbox's Ray executor needs Ray: pip install 'taichi-sandbox[ray]'") from err
    return ray


def resource_options(spec: JobSpec, limits: Limits, device_memory: int | None = None) -> dict[str, Any]:
    """Ray `.options()` for a job with these (effective) limits; see the module table."""
    options: dict[str, Any] = {"num_cpus": limits.cpu_threads or 1, "max_retries": 0}
    if limits.memory is not None:
        options["memory"] = limits.memory
    if spec.arch != "cpu":
        options["num_gpus"] = gpu_fraction(limits, device_memory)
    return options


def gpu_fraction(limits: Limits, device_memory: int | None) -> float:
    """The share of one device a non-CPU job asks Ray for."""
    if isinstance(limits.gpu_memory, float):
        return limits.gpu_memory
    if isinstance(limits.gpu_memory, int) and device_memory:
        return min(1.0, math.ceil(100 * limits.gpu_memory / device_memory) / 100)
    return 1


def gpu_bytes(spec: JobSpec, limits: Limits, device_memory: int | None) -> int:
    """GPU memory a job counts against its tenant's `gpu_memory_quota`: its limit in bytes (a fraction
    of `device_memory`), a whole device for a non-CPU job without one; 0 when the size is unknown."""
    if spec.arch == "cpu":
        return 0
    if isinstance(limits.gpu_memory, int):
        return limits.gpu_memory
    return int(gpu_fraction(limits, device_memory) * device_memory) if device_memory else 0
