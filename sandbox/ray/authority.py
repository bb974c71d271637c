"""The cluster quota authority's core: tenants' quotas and nodes' memory handed out as leases, with
their queues, expiry and persistence. Pure asyncio on one event loop, no Ray: the Ray actor wraps it
1:1 as an async actor.

A job's lease: `acquire` (the tenant's quotas: max_concurrent, memory_quota, gpu_memory_quota) →
`attach` (the node it runs on: the node's memory, and the `room` the node needs to end the job) →
`renew` by its holder → `release`. A waiter not renewed within `ttl` expires; a lease attached to a
node expires `_span` after its last renewal (at least `ttl`, longer when the node's room is more
than half of it), never sooner: by then the node has ended the job itself (sandbox.ray.keeper), so a
share is never handed out again while its job may still run. For the same reason a node that
leaves `nodes()` (dead, or only cut off) does not free its leases: they lapse. Waiters wait on
futures, woken when capacity frees (no polling): per tenant and per node, higher priority first,
then first come. A tenant's blocked head waits behind nobody else's. Every call that changes a
lease replies only once a snapshot covering its change is saved (group commit: one save in flight,
changes meanwhile batched into the next; a failing save is retried with backoff, never skipped).
A restarted authority resumes from the snapshot: each restored lease gets a fresh span, and callers
retrying by lease id find theirs. Waiters are not saved (they hold nothing): their callers' retried
calls queue them again.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import time
from collections import OrderedDict
from typing import Callable

from .leases import QUOTAS, Attach, Node, Request, Tenant, invalid, invalid_attach, never_fits, record, refusal
from .nodetable import NodeTable
from .store import GroupCommit, Store

FORMAT = 2  # older code refuses it by name rather than misreading it
ENDED_KEPT = 10_000  # how many ended leases' reasons `ended()` remembers


class Authority(NodeTable):
    """Leases of tenants' quotas and nodes' memory (see the module docstring); one event loop."""

    def __init__(self, store: Store, ttl: float = 30.0, nodes: Callable[[], dict[str, int]] | None = None,
                 refresh: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        """`nodes()`: {node_id: memory bytes} of the live nodes (blocking; run in a thread); None:
        nodes are known only from attach's `node_memory`."""
        self.store, self.ttl, self.refresh, self.clock = store, ttl, refresh, clock
        self._nodes_fn = nodes
        self._leases: dict[str, Request] = {}
        self._waiting: dict[str, Request] = {}
        self._futures: dict[str, asyncio.Future] = {}  # tenant-level waiters someone awaits
        self._attaching: dict[str, Attach] = {}
        self._tenants: dict[str, Tenant] = {}
        self._nodes: dict[str, Node] = {}
        self._quota_blocked: dict[str, dict[str, str]] = {}  # tenant → {lease: node} its memory_quota holds at attach
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._seq = itertools.count()
        self._epoch = 0
        self._commit = GroupCommit(store, self._snapshot)
        self._changed, self._durable = self._commit.changed, self._commit.durable
        self._tasks: list[asyncio.Task] = []
        self._refreshing: asyncio.Future | None = None

    # -- life --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the store (raising rather than starting empty over state it cannot read), give every
        restored lease and waiter a fresh ttl, start the loops, and save the new epoch."""
        data = await asyncio.to_thread(self.store.load)
        if data is not None:
            self._restore(json.loads(data))
        self._tasks = [asyncio.create_task(self._commit.run()), asyncio.create_task(self._expiry_loop())]
        if self._nodes_fn is not None:
            await self._refresh_nodes()
            self._tasks.append(asyncio.create_task(self._refresh_loop()))
        for name in list(self._tenants):
            self._pump_tenant(name)
        for node in list(self._nodes):
            self._pump_node(node)
        self._changed()
        await self._durable()

    async def close(self) -> None:
        """Stop the loops; calls still waiting are cancelled (their lease ids stay re-joinable in the store)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for fut in [*self._futures.values(), *(a.future for a in self._attaching.values())]:
            fut.cancel()
        self._commit.cancel()

    # -- the calls ---------------------------------------------------------------------------
    async def acquire(self, lease_id: str, tenant: str, holder: str, memory: int | None, gpu_memory: int,
                      quotas: dict, priority: int = 0) -> dict:
        """Tenant-level admission: {"granted": lease_id, "ttl": ttl} once granted and saved;
        {"refused": reason} at once when the demand alone exceeds a quota; {"lost": reason} when
        the waiter was released or expired. The same lease_id again returns the same grant or
        joins the same wait (for the same tenant; another's is refused)."""
        known = self._leases.get(lease_id) or self._waiting.get(lease_id)
        if known is not None and known.tenant != tenant:
            return {"refused": f"lease id {lease_id!r:.80} is in use by another tenant"}
        if lease_id not in self._leases:
            if lease_id not in self._waiting:
                if lease_id in self._ended:
                    return {"lost": self._ended[lease_id]}
                why = invalid(lease_id, tenant, holder, memory, gpu_memory, quotas, priority)
                if why:
                    return {"refused": why}
                quotas = {k: quotas.get(k) for k in QUOTAS}
                why = refusal(memory, gpu_memory, quotas)
                if why:
                    return {"refused": why}
                req = Request(lease_id, tenant, holder, memory, gpu_memory, quotas, priority, next(self._seq),
                              deadline=self.clock() + self.ttl)
                self._enqueue(req)
                self._pump_tenant(tenant)
            if lease_id not in self._leases:
                fut = self._futures.get(lease_id)
                if fut is None:
                    fut = self._futures[lease_id] = asyncio.get_running_loop().create_future()
                answer = await asyncio.shield(fut)
                if "lost" in answer:
                    return answer
        await self._durable()
        return {"granted": lease_id, "ttl": self.ttl}

    async def attach(self, lease_id: str, node_id: str, holder: str, node_memory: int | None = None,
                     room: float = 0.0) -> dict:
        """Bind a granted lease to its node once the node has room for it (its memory; None: the
        node's whole memory) and, for an unlimited job, the tenant's memory_quota has room for the
        node's memory. From then on only `holder` renews it, and it lapses `_span` after its last
        renewal (`room`: the seconds the node needs to end the job). {"attached": node_id, "ttl":
        ttl, "waited": seconds since this call arrived} once saved, the lease renewed as of the
        answer (the node counts its first deadline from when it sent the call, plus `waited`), or
        {"lost": reason}. Idempotent."""
        received = self.clock()
        if not isinstance(lease_id, str):
            return {"lost": f"lease_id: must be a string (got {lease_id!r:.60})"}
        lease = self._leases.get(lease_id)
        if lease is None:
            return {"lost": self._ended.get(lease_id, f"lease {lease_id} was never granted")}
        why = invalid_attach(node_id, holder, node_memory, room)
        if why:
            return {"lost": why}
        if lease.node is None:
            pending = self._attaching.get(lease_id)
            if pending is None:
                why = await self._known_node(node_id, node_memory)
                lease = self._leases.get(lease_id)
                if lease is None:
                    return {"lost": self._ended.get(lease_id, "released")}
                why = why or never_fits(lease, node_id, self._nodes[node_id].total)
                if why:
                    return {"lost": why}
                pending = self._attaching.get(lease_id)
                if pending is None and lease.node is None:
                    pending = self._attaching[lease_id] = Attach(node_id, holder, float(room),
                                                                 asyncio.get_running_loop().create_future())
                    bisect.insort(self._nodes[node_id].queue, (lease.key, lease_id))
                    self._pump_node(node_id)
            if pending is not None and lease.node is None:
                if pending.node != node_id:
                    return {"lost": f"lease {lease_id} is being attached to node {pending.node}"}
                answer = await asyncio.shield(pending.future)
                if "lost" in answer:
                    return answer
        if lease.node != node_id:
            return {"lost": f"lease {lease_id} is attached to node {lease.node}"}
        now = self.clock()
        lease.deadline = max(lease.deadline, now + self._span(lease))
        await self._durable()
        return {"attached": node_id, "ttl": self.ttl, "waited": now - received}

    async def renew(self, lease_ids: list[str], holder: str) -> dict:
        """Extend to now + ttl each lease or waiter that `holder` holds (a lease being attached:
        also its attacher); {"lost": [the ids not held by holder]}."""
        now, lost = self.clock(), []
        for lease_id in lease_ids:
            if not isinstance(lease_id, str):
                lost.append(lease_id)
                continue
            req = self._leases.get(lease_id) or self._waiting.get(lease_id)
            pending = self._attaching.get(lease_id)
            if req is not None and (req.holder == holder or (pending is not None and pending.holder == holder)):
                req.deadline = now + self._span(req)
            else:
                lost.append(lease_id)
        return {"lost": lost}

    async def release(self, lease_ids: list[str], unbound_only: bool = False) -> None:
        """Free these leases and withdraw these waiters (unknown ids are ignored); returns once saved.
        `unbound_only`: leave a lease attached to a node to its holder, or to lapse (a driver whose
        task failed cannot know that the job has ended on its node: only the node's silence shows it)."""
        for lease_id in lease_ids:
            if isinstance(lease_id, str) and not (unbound_only and getattr(self._leases.get(lease_id), "node", None)):
                self._end(lease_id, "released")
        await self._durable()

    def usage(self) -> dict:
        """{"tenants": {t: {"running", "memory", "gpu_memory", "waiting"}}, "nodes": {n: {"memory_total",
        "memory_reserved", "leases", "waiting" (at attach)}}, "leases": granted, "waiting": waiters at
        acquire and at attach, "epoch": how many times the state was restored}."""
        tenants = {name: {"running": t.running, "memory": t.memory, "gpu_memory": t.gpu_memory,
                          "waiting": len(t.queue)} for name, t in self._tenants.items()}
        nodes = {name: {"memory_total": n.total, "memory_reserved": n.reserved, "leases": len(n.leases),
                        "waiting": len(n.queue)} for name, n in self._nodes.items()}
        return {"tenants": tenants, "nodes": nodes, "leases": len(self._leases),
                "waiting": len(self._waiting) + len(self._attaching), "epoch": self._epoch}

    def ended(self, lease_id: str) -> str | None:
        """Why a recent lease or waiter ended (released, expired, its node gone), else None."""
        return self._ended.get(lease_id)

    # -- admission ---------------------------------------------------------------------------
    def _enqueue(self, req: Request) -> None:
        self._waiting[req.lease_id] = req
        bisect.insort(self._tenants.setdefault(req.tenant, Tenant()).queue, (req.key, req.lease_id))

    def _pump_tenant(self, name: str) -> None:
        """Grant the tenant's waiters in order while its head fits. While an unlimited job of the
        tenant waits at attach for its memory_quota, no waiter takes memory ahead of it."""
        tenant = self._tenants[name]
        while tenant.queue:
            req = self._waiting[tenant.queue[0][1]]
            q = req.quotas
            if ((q["max_concurrent"] is not None and tenant.running + 1 > q["max_concurrent"])
                    or (req.memory and self._quota_blocked.get(name))
                    or (q["memory_quota"] is not None and tenant.memory + (req.memory or 0) > q["memory_quota"])
                    or (q["gpu_memory_quota"] is not None
                        and tenant.gpu_memory + req.gpu_memory > q["gpu_memory_quota"])):
                return
            tenant.queue.pop(0)
            del self._waiting[req.lease_id]
            self._leases[req.lease_id] = req
            self._charge(req, 1)
            self._changed()
            fut = self._futures.pop(req.lease_id, None)
            if fut is not None and not fut.done():
                fut.set_result({"granted": req.lease_id})

    def _charge(self, lease: Request, sign: int) -> None:
        tenant = self._tenants.setdefault(lease.tenant, Tenant())
        tenant.running += sign
        tenant.memory += sign * lease.charge
        tenant.gpu_memory += sign * lease.gpu_memory

    def _pump_node(self, node_id: str) -> None:
        """Bind the node's attach waiters in order while the node has room; one held back only by
        its tenant's memory_quota is passed over (it does not hold the node)."""
        node = self._nodes.get(node_id)
        if node is None:
            return
        for item in list(node.queue):
            lease_id = item[1]
            lease, pending = self._leases[lease_id], self._attaching[lease_id]
            need = lease.memory if lease.memory is not None else node.total
            if node.reserved + need > node.total:
                return
            quota = lease.quotas["memory_quota"]
            if lease.memory is None and quota is not None and self._tenants[lease.tenant].memory + need > quota:
                self._quota_blocked.setdefault(lease.tenant, {})[lease_id] = node_id
                continue
            node.queue.remove(item)
            self._unblock(lease)
            del self._attaching[lease_id]
            self._charge(lease, -1)
            lease.node, lease.reserved, lease.holder, lease.room = node_id, need, pending.holder, pending.room
            self._charge(lease, 1)
            node.reserved += need
            node.leases.add(lease_id)
            self._changed()
            if not pending.future.done():
                pending.future.set_result({"attached": node_id})

    def _unblock(self, lease: Request) -> None:
        blocked = self._quota_blocked.get(lease.tenant)
        if blocked is not None:
            blocked.pop(lease.lease_id, None)
            if not blocked:
                del self._quota_blocked[lease.tenant]

    # -- ending ------------------------------------------------------------------------------
    def _end(self, lease_id: str, reason: str, wake: bool = True) -> Request | None:
        """Free a lease or withdraw a waiter and answer whoever waits on it; unless not `wake`, wake
        whoever its room now fits. The lease or waiter, None if unknown."""
        req = self._leases.pop(lease_id, None)
        if req is not None:
            self._changed()
            self._charge(req, -1)
            node = self._nodes.get(req.node) if req.node else None
            if node is not None:
                node.reserved -= req.reserved
                node.leases.discard(lease_id)
            pending = self._attaching.pop(lease_id, None)
            if pending is not None:
                self._unblock(req)
                if pending.node in self._nodes:
                    self._nodes[pending.node].queue.remove((req.key, lease_id))
                pending.future.set_result({"lost": reason})
        else:
            req = self._waiting.pop(lease_id, None)
            if req is None:
                return None
            self._tenants[req.tenant].queue.remove((req.key, lease_id))
            fut = self._futures.pop(lease_id, None)
            if fut is not None and not fut.done():
                fut.set_result({"lost": reason})
        self._ended[lease_id] = reason
        if len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)
        if wake:
            self._wake([req])
        return req

    def _wake(self, ended: list[Request]) -> None:
        """Nodes first: a lease waiting there was granted before any waiter of its tenant."""
        for node_id in {r.node for r in ended if r.node}:
            self._pump_node(node_id)
        for tenant in {r.tenant for r in ended}:
            for node_id in set(self._quota_blocked.get(tenant, {}).values()):
                self._pump_node(node_id)
            self._pump_tenant(tenant)

    def _expire(self) -> None:
        """End every lease and waiter past its deadline, then wake the rest (no expired waiter is granted)."""
        now = self.clock()
        ended = [self._end(k, f"expired while waiting: not renewed within the ttl ({self.ttl:g} s)", wake=False)
                 for k in [k for k, r in self._waiting.items() if r.deadline < now]]
        ended += [self._end(k, f"expired: not renewed within {self._span(r):g} s", wake=False)
                  for k, r in [(k, r) for k, r in self._leases.items() if r.deadline < now]]
        self._wake(ended)

    def _span(self, req: Request) -> float:
        """How long after its last renewal a lease lapses: `ttl`, or more when its node needs more
        than half of it to end the job (`room`). A node ends its job by `sent + ttl − min(ttl/2,
        room)` plus, should its supervisor be frozen, room − 1 s for the fork-server's kill
        (sandbox.ray.keeper.node_deadline, sandbox.job.backstop): always before this."""
        return max(self.ttl, self.ttl / 2 + req.room)

    async def _expiry_loop(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 4)
            self._expire()

    # -- persistence (GroupCommit saves) --------------------------------------------------
    def _snapshot(self) -> bytes:
        return json.dumps({"format": FORMAT, "epoch": self._epoch,
                           "leases": [record(r) for r in self._leases.values()],
                           "nodes": {name: n.total for name, n in self._nodes.items() if n.given}}).encode()

    def _restore(self, state: dict) -> None:
        if state.get("format") not in (1, FORMAT):  # 1: also waiters (ignored), no room (0)
            raise ValueError(f"the authority's saved state has format {state.get('format')!r}, not {FORMAT}")
        self._epoch = state["epoch"] + 1
        now = self.clock()
        self._nodes = {name: Node(total, given=True) for name, total in state["nodes"].items()}
        seqs = [-1]
        for rec in state["leases"]:
            lease = self._leases[rec["lease_id"]] = Request(**rec)
            lease.deadline = now + self._span(lease)
            self._charge(lease, 1)
            if lease.node is not None:
                # a node of nodes() holds no more than restored until the first refresh says
                node = self._nodes.setdefault(lease.node, Node(0, given=False))
                node.total += 0 if node.given else lease.reserved
                node.reserved += lease.reserved
                node.leases.add(lease.lease_id)
            seqs.append(lease.seq)
        self._seq = itertools.count(max(seqs) + 1)

