"""Who runs next and who yields, pure: the executor holds the state (its queue's `Entry`s) and the
lock; nothing here blocks.

Order of the queue (as Slurm's multifactor priority, with the job's priority as a strict class):
  1. priority, strictly: no job of a lower priority starts while one of a higher priority could;
  2. within a priority, the tenant's fair-share factor 2^(-U/S) (U: its share of the recent usage of
     all tenants, decayed with `[scheduler] fair_share_half_life`; S: its share of all tenants'
     `shares`), plus ageing: `age_weight` × seconds waited / `max_age`, at most `age_weight`;
  3. then first come, first served.
Preemption: a job that does not fit may end running jobs of a lower priority that are preemptible:
those of the lowest priorities that can make room, the fewest of them, and among as few the
youngest (the least work lost). When even all of them would not make room, none is taken.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..core.limits import Scheduler, Tenant
from .quotas import Capacity, Demand, TenantUsage, fits

SEARCH_BOUND = 20000  # sets of victims tried before settling for fewer tries (`_spare`)


class FairShare:
    """Each tenant's recent usage, decayed with the half-life: CPU-seconds ("cpu") or reserved
    GiB-seconds of memory ("memory"), charged when a job ends. Not thread-safe: the executor's lock."""

    def __init__(self, settings: Scheduler) -> None:
        self.settings = settings
        self._usage: dict[str, tuple[float, float]] = {}  # tenant -> (usage, when it was that)

    def charge(self, tenant: str, cpu_seconds: float, memory: int, seconds: float, now: float) -> None:
        """A job of `tenant` ended: it used `cpu_seconds`, reserving `memory` bytes for `seconds`."""
        amount = cpu_seconds if self.settings.fair_share_usage == "cpu" else memory / 2**30 * seconds
        self._usage[tenant] = (self.usage(tenant, now) + max(0.0, amount), now)

    def usage(self, tenant: str, now: float) -> float:
        value, at = self._usage.get(tenant, (0.0, now))
        return value * 0.5 ** (max(0.0, now - at) / self.settings.fair_share_half_life)

    def factors(self, shares: dict[str, int], now: float) -> dict[str, float]:
        """Per tenant of `shares` (tenant -> its shares): 2^(-U/S), 1 for a tenant without recent usage."""
        usage = {name: self.usage(name, now) for name in shares}
        total_usage, total_shares = sum(usage.values()), sum(shares.values())
        if total_usage <= 0:
            return dict.fromkeys(shares, 1.0)
        return {name: 2 ** -((usage[name] / total_usage) / (shares[name] / total_shares)) for name in shares}


def rank(priority: int, factor: float, waited: float, seq: int, settings: Scheduler) -> tuple:
    """The sort key of a queued job: smaller runs first."""
    age = settings.age_weight * min(1.0, max(0.0, waited) / settings.max_age)
    return -priority, -(factor + age), seq


@dataclass(eq=False)
class Entry:
    """A job in the executor's queue, or running (the executor's lock guards it)."""

    future: Any  # the executor's JobFuture
    demand: Demand
    priority: int
    seq: int
    submitted: float = field(default_factory=time.monotonic)
    recorded: bool = True  # its `submitted` record is written (workers see it only then)
    preemptible: bool = False
    requeue: bool = False
    started: float = 0.0  # when its current run started (monotonic)
    runs: int = 0  # runs ended by a preemption that requeued it
    room: list["Entry"] = field(default_factory=list)  # running jobs preempted to make room for it


@dataclass(frozen=True)
class Running:
    """A running job that could be preempted: `handle` is the executor's."""

    handle: Any
    tenant: str
    demand: Demand
    priority: int
    started: float


def victims(need: Demand, priority: int, used: Demand, cap: Capacity, tenant: Tenant, tenant_name: str,
            usage: TenantUsage, running: Sequence[Running]) -> list[Running]:
    """The running jobs to preempt so that a job of `tenant_name` at `priority` demanding `need` fits
    (`running`: the preemptible ones, `used`: what the node has in use); [] when none would do."""
    eligible = sorted((r for r in running if r.priority < priority), key=lambda r: (r.priority, -r.started))

    def fits_without(chosen: Sequence[Running]) -> bool:
        freed = Demand(sum(r.demand.cpu for r in chosen), sum(r.demand.memory for r in chosen),
                       sum(r.demand.gpu_memory for r in chosen))
        own = [r for r in chosen if r.tenant == tenant_name]
        mine = TenantUsage(running=usage.running - len(own), memory=usage.memory - sum(r.demand.memory for r in own),
                           gpu_memory=usage.gpu_memory - sum(r.demand.gpu_memory for r in own))
        left = Demand(used.cpu - freed.cpu, used.memory - freed.memory, used.gpu_memory - freed.gpu_memory)
        return fits(need, left, cap, tenant, mine)

    for level in sorted({r.priority for r in eligible}):
        pool = [r for r in eligible if r.priority <= level]
        if not fits_without(pool):
            continue
        tried = 0
        for size in range(1, len(pool) + 1):
            for chosen in itertools.combinations(pool, size):  # the lowest and youngest come first
                if fits_without(chosen):
                    return list(chosen)
                tried += 1
                if tried > SEARCH_BOUND:
                    return _spare(pool, fits_without)
    return []


def _spare(pool: list[Running], fits_without) -> list[Running]:
    """Past SEARCH_BOUND tries: all of `pool`, then each spared in turn (the highest priority, then
    the oldest first) while the job still fits without it."""
    chosen = list(pool)
    for spared in sorted(pool, key=lambda r: (-r.priority, r.started)):
        rest = [r for r in chosen if r is not spared]
        if fits_without(rest):
            chosen = rest
    return chosen


def describe(job_id: str, tenant: str, priority: int) -> str:
    """How a preemption reason names the job that needed the room."""
    return f"job {job_id} (tenant {tenant}, priority {priority})"

