"""The arithmetic of admission, pure: the node's capacity, what a job demands, whether it can ever
run here, whether it fits now, and the quota report; plus the quota.json snapshot that
`taichi-sandbox quota` reads. The executor holds the state and the lock; nothing here blocks on it.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..core.limits import Limits, Policy, Tenant
from ..core.models import JobSpec
from ..core.ratelimit import TokenBucket


@dataclass(frozen=True)
class Demand:
    """What one job reserves while it runs."""

    cpu: int
    memory: int
    gpu_memory: int


@dataclass(frozen=True)
class Capacity:
    cpu_slots: int
    memory: int
    gpu_memory: int | None  # None: not accounted (no GPU known)


@dataclass
class TenantUsage:
    """One tenant's jobs on this node: what its running jobs reserve, and counters."""

    running: int = 0
    memory: int = 0
    gpu_memory: int = 0
    queued: int = 0
    rejections: int = 0
    violations: int = 0
    bucket: TokenBucket | None = None  # submissions, when the tenant has a `rate`


def node_capacity(policy: Policy, gpu_total: int | None, memory_limit: int | None = None) -> Capacity:
    """[node] from limits.toml, defaulting to what psutil and NVML report (memory: no more than
    `memory_limit`, the tightest limit of the service's own memory cgroup)."""
    node = policy.node
    return Capacity(cpu_slots=node.cpu_slots or os.cpu_count() or 1,
                    memory=node.memory or min(psutil.virtual_memory().total, memory_limit or 1 << 62),
                    gpu_memory=node.gpu_memory if node.gpu_memory is not None else gpu_total)


def demand(spec: JobSpec, limits: Limits, capacity: Capacity) -> Demand:
    """Memory unlimited reserves the whole node; a GPU job without a gpu_memory limit, the whole
    device; a fractional limit, that fraction of the device."""
    gpu = 0
    if spec.arch != "cpu" and capacity.gpu_memory is not None:
        if limits.gpu_memory is None:
            gpu = capacity.gpu_memory
        elif isinstance(limits.gpu_memory, float):
            gpu = int(limits.gpu_memory * capacity.gpu_memory)
        else:
            gpu = limits.gpu_memory
    return Demand(cpu=limits.cpu_threads or 1, memory=limits.memory or capacity.memory, gpu_memory=gpu)


def admission_problem(name: str, need: Demand, tenant: Tenant, cap: Capacity) -> tuple[str, str] | None:
    """(reason code, message) when a job of tenant `name` demanding `need` can never run here."""
    if need.cpu > cap.cpu_slots:
        return "capacity_cpu", f"needs {need.cpu} CPU slots; node has {cap.cpu_slots}"
    if need.memory > cap.memory:
        return "capacity_memory", (f"memory {_size(need.memory)} exceeds node capacity {_size(cap.memory)} "
                                   f"by {_size(need.memory - cap.memory)}")
    if cap.gpu_memory is not None and need.gpu_memory > cap.gpu_memory:
        return "capacity_gpu_memory", (f"gpu_memory {_size(need.gpu_memory)} exceeds node capacity "
                                       f"{_size(cap.gpu_memory)} by {_size(need.gpu_memory - cap.gpu_memory)}")
    if tenant.memory_quota is not None and need.memory > tenant.memory_quota:
        return "quota_memory", (f"tenant {name} memory quota {_size(tenant.memory_quota)} exceeded by "
                                f"{_size(need.memory - tenant.memory_quota)}")
    if tenant.gpu_memory_quota is not None and need.gpu_memory > tenant.gpu_memory_quota:
        return "quota_gpu_memory", (f"tenant {name} gpu_memory quota {_size(tenant.gpu_memory_quota)} exceeded "
                                    f"by {_size(need.gpu_memory - tenant.gpu_memory_quota)}")
    return None


def fits(need: Demand, used: Demand, cap: Capacity, tenant: Tenant, usage: TenantUsage) -> bool:
    """Whether a job fits what the node and its tenant have free now."""
    if used.cpu + need.cpu > cap.cpu_slots or used.memory + need.memory > cap.memory:
        return False
    if cap.gpu_memory is not None and used.gpu_memory + need.gpu_memory > cap.gpu_memory:
        return False
    return not ((tenant.max_concurrent is not None and usage.running >= tenant.max_concurrent)
                or (tenant.memory_quota is not None and usage.memory + need.memory > tenant.memory_quota)
                or (tenant.gpu_memory_quota is not None
                    and usage.gpu_memory + need.gpu_memory > tenant.gpu_memory_quota))


def report(tenants: dict[str, tuple[Tenant, TenantUsage]], used: Demand, cap: Capacity, now: float) -> dict:
    """Per tenant: running, queued, used vs quota, rejections and violations; the node's use of its
    capacity (a JSON-able dict: `quota_state`, quota.json)."""
    rows = {}
    for name, (tenant, usage) in sorted(tenants.items()):
        rows[name] = {
            "running": usage.running, "queued": usage.queued, "rejections": usage.rejections,
            "violations": usage.violations,
            "concurrency": {"used": usage.running, "quota": tenant.max_concurrent},
            "memory": {"used": usage.memory, "quota": tenant.memory_quota},
            "gpu_memory": {"used": usage.gpu_memory, "quota": tenant.gpu_memory_quota},
        }
    return {"updated": now, "node": {"cpu_slots": [used.cpu, cap.cpu_slots], "memory": [used.memory, cap.memory],
                                     "gpu_memory": [used.gpu_memory, cap.gpu_memory]},
            "tenants": rows}


class QuotaFile:
    """quota.json, written by atomic replace. Reports are numbered when taken (under the caller's
    lock) and written later without it; an older one never overwrites a newer one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._taken = self._saved = 0

    def number(self) -> int:
        """The next report's number (call under the lock that orders the reports)."""
        self._taken += 1
        return self._taken

    def save(self, number: int, state: dict) -> None:
        with self._lock:
            if number <= self._saved:
                return
            self._saved = number
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(".tmp")
                with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:  # not for jobs
                    f.write(json.dumps(state))
                os.replace(tmp, self.path)
            except OSError:
                pass


def _size(n: float) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MiB"
