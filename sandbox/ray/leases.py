"""The records of the cluster quota authority (sandbox.ray.authority): a request (waiter, then lease),
a tenant's and a node's tallies and queues, and an attach waiter; what of a request is persisted."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

QUOTAS = ("max_concurrent", "memory_quota", "gpu_memory_quota")
PERSISTED = ("lease_id", "tenant", "holder", "memory", "gpu_memory", "quotas", "priority", "seq", "node", "reserved")


@dataclass
class Request:
    """A tenant-level waiter or, once granted, a lease."""
    lease_id: str
    tenant: str
    holder: str
    memory: int | None  # None: unlimited (the node's whole memory once attached)
    gpu_memory: int
    quotas: dict
    priority: int
    seq: int
    node: str | None = None
    reserved: int = 0  # the node's memory held since attach
    deadline: float = 0.0

    @property
    def key(self) -> tuple[int, int]:
        return (-self.priority, self.seq)

    @property
    def charge(self) -> int:
        """The memory counted against the tenant's memory_quota."""
        return self.memory if self.memory is not None else self.reserved


@dataclass
class Tenant:
    running: int = 0
    memory: int = 0
    gpu_memory: int = 0
    queue: list = field(default_factory=list)  # (key, lease_id), in grant order


@dataclass
class Node:
    total: int
    given: bool  # known from attach's node_memory (persisted), not from nodes()
    reserved: int = 0
    leases: set = field(default_factory=set)
    queue: list = field(default_factory=list)  # (key, lease_id) of attach waiters


@dataclass
class Attach:
    node: str
    holder: str
    future: asyncio.Future


def record(req: Request) -> dict:
    """The persisted fields of a request (JSON)."""
    return {k: getattr(req, k) for k in PERSISTED}


def refusal(memory: int | None, gpu_memory: int, quotas: dict) -> str | None:
    """Why a demand can never fit the tenant's quotas on its own, else None."""
    if quotas["max_concurrent"] is not None and quotas["max_concurrent"] < 1:
        return f"the tenant's max_concurrent is {quotas['max_concurrent']}"
    if memory is not None and quotas["memory_quota"] is not None and memory > quotas["memory_quota"]:
        return f"the job's memory ({memory} bytes) exceeds the tenant's memory_quota ({quotas['memory_quota']} bytes)"
    if quotas["gpu_memory_quota"] is not None and gpu_memory > quotas["gpu_memory_quota"]:
        return (f"the job's gpu_memory ({gpu_memory} bytes) exceeds the tenant's gpu_memory_quota "
                f"({quotas['gpu_memory_quota']} bytes)")
    return None
