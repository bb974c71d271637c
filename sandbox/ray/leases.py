"""The records of the cluster quota authority (sandbox.ray.authority): a request (waiter, then lease),
a tenant's and a node's tallies and queues, and an attach waiter; what of a request is persisted."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

QUOTAS = ("max_concurrent", "memory_quota", "gpu_memory_quota")
PERSISTED = ("lease_id", "tenant", "holder", "memory", "gpu_memory", "quotas", "priority", "seq", "node", "reserved",
             "room")
MAX_ROOM = 3600.0  # seconds a node may ask for to end a job


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
    room: float = 0.0  # seconds its node needs to end the job (see Authority._span)
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
    room: float
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


def never_fits(lease: Request, node_id: str, total: int) -> str | None:
    """Why a lease can never be attached to a node of `total` bytes, else None."""
    quota = lease.quotas["memory_quota"]
    if lease.memory is not None and lease.memory > total:
        return f"the job's memory ({lease.memory} bytes) exceeds node {node_id}'s ({total} bytes)"
    if lease.memory is None and quota is not None and total > quota:
        return (f"an unlimited job reserves node {node_id}'s whole memory ({total} bytes), "
                f"more than tenant {lease.tenant}'s memory_quota ({quota} bytes)")
    return None


def invalid(lease_id, tenant, holder, memory, gpu_memory, quotas, priority) -> str | None:
    """What is malformed in an acquire's arguments (`field: problem (got VALUE)`), else None: a
    negative or non-integer amount would otherwise count against a quota as room."""
    for name, value in (("lease_id", lease_id), ("tenant", tenant), ("holder", holder)):
        if not isinstance(value, str) or not value:
            return f"{name}: must be a non-empty string (got {value!r:.60})"
    if not isinstance(quotas, dict):
        return f"quotas: must be a dict of {', '.join(QUOTAS)} (got {quotas!r:.60})"
    if not _whole(priority, signed=True):
        return f"priority: must be a whole number (got {priority!r:.60})"
    for name, value in (("memory", memory), ("gpu_memory", gpu_memory), *((k, quotas.get(k)) for k in QUOTAS)):
        if not (value is None and name != "gpu_memory") and not _whole(value):
            optional = "" if name == "gpu_memory" else " or None"
            return f"{name}: must be a whole number ≥ 0{optional} (got {value!r:.60})"
    return None


def invalid_attach(node_id, holder, node_memory, room) -> str | None:
    """What is malformed in an attach's arguments, else None."""
    if not isinstance(node_id, str) or not isinstance(holder, str):
        return "node_id, holder: must be strings"
    if not (node_memory is None or (_whole(node_memory) and node_memory > 0)):
        return f"node_memory: must be a whole number of bytes > 0 or None (got {node_memory!r:.60})"
    if type(room) not in (int, float) or not 0 <= room <= MAX_ROOM:
        return f"room: must be seconds between 0 and {MAX_ROOM:g} (got {room!r:.60})"
    return None


def _whole(value, signed: bool = False) -> bool:
    return type(value) is int and (signed or value >= 0)
