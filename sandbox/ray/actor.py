"""The cluster's quota authority as a Ray actor: `authority()` finds it (or creates it, once per
cluster), `AuthorityActor` wraps sandbox.ray.authority.Authority 1:1.

Survival: the actor is detached, pinned to the head node (Ray's `node:__internal_head__` resource:
the node whose loss ends the cluster anyway), restarted by Ray after any failure
(`max_restarts=-1`), and its callers' calls are retried on the restarted actor
(`max_task_retries=-1`; every call is idempotent by lease id). Its state lives in the GCS key-value
store (sandbox.ray.store.GcsStore), written before any call that changed it returns, and is read
back by every new incarnation: a restarted authority has every lease, and only a cluster whose GCS
never held the state (its first use) starts an empty one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

from .authority import Authority
from .options import _ray
from .store import GcsStore

NAME, NAMESPACE = "taichi_sandbox_quota_authority", "taichi_sandbox"
STATE_KEY = "authority/state"
MAX_CALLS = 100_000  # concurrent calls the actor holds: every waiting acquire or attach is one


def live_nodes() -> dict[str, int]:
    """{node id: memory bytes} of the cluster's live nodes (the `memory` resource each advertises)."""
    return {n["NodeID"]: int(n["Resources"].get("memory", 0)) for n in _ray().nodes() if n.get("Alive")}


class AuthorityActor:
    """An async Ray actor: one event loop runs the Authority; waiting calls are coroutines, not threads."""

    def __init__(self, ttl: float) -> None:
        self._ttl = ttl
        self._calls: Counter = Counter()  # per method, since this incarnation started: `usage()["calls"]`
        self._core: Authority | None = None
        self._starting: asyncio.Future | None = None

    async def _authority(self, call: str) -> Authority:
        """The started Authority; a start that failed (its state unreadable for now) is tried again
        by the next call rather than kept: callers get the error meanwhile (verdict `rejected`)."""
        self._calls[call] += 1
        if self._core is None:
            if self._starting is None or (self._starting.done() and self._starting.exception() is not None):
                self._starting = asyncio.ensure_future(self._start())
            await asyncio.shield(self._starting)
        return self._core

    async def _start(self) -> None:
        core = Authority(GcsStore(STATE_KEY, NAMESPACE), ttl=self._ttl, nodes=live_nodes)
        await core.start()
        self._core = core

    async def acquire(self, *args, **kwargs) -> dict:
        return await (await self._authority("acquire")).acquire(*args, **kwargs)

    async def attach(self, *args, **kwargs) -> dict:
        return await (await self._authority("attach")).attach(*args, **kwargs)

    async def renew(self, *args, **kwargs) -> dict:
        """The Authority's answer, and its `ttl` (a keeper renews at the pace of the authority's ttl)."""
        core = await self._authority("renew")
        return {**await core.renew(*args, **kwargs), "ttl": self._ttl}

    async def release(self, *args, **kwargs) -> None:
        return await (await self._authority("release")).release(*args, **kwargs)

    async def usage(self) -> dict:
        """The Authority's usage, and `calls`: how many calls of each kind this incarnation answered."""
        core = await self._authority("usage")
        return {**core.usage(), "calls": dict(self._calls)}


_handles: dict[str, object] = {}
_dead: set[str] = set()  # ids of authorities a call found dead
_handles_lock = threading.Lock()
_ttl = 30.0
LOOKUPS = 100  # tries, LOOKUP_PAUSE apart, while the GCS still names a dead authority
LOOKUP_PAUSE = 0.05


def _id(handle) -> str:
    return handle._actor_id.hex()  # no public accessor


def authority(ttl: float | None = None):
    """The cluster's AuthorityActor handle. The first caller in a cluster creates it with `ttl` (its
    `[cluster] lease_ttl`; None: the last one this process gave, else 30 s); later ones get that one,
    whatever their own ttl (each grant and renewal says the authority's)."""
    global _ttl
    _ttl = ttl if ttl is not None else _ttl
    ray = _ray()
    key = ray.get_runtime_context().gcs_address
    with _handles_lock:
        handle = _handles.get(key)
        for _ in range(LOOKUPS if handle is None else 0):
            handle = ray.remote(AuthorityActor).options(
                name=NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, max_restarts=-1,
                max_task_retries=-1, max_concurrency=MAX_CALLS, num_cpus=0,
                resources={"node:__internal_head__": 0.001}).remote(_ttl)
            if _id(handle) not in _dead:
                break
            time.sleep(LOOKUP_PAUSE)  # killed for good a moment ago: its name is not free yet
        _handles[key] = handle
        return handle


def forget() -> None:
    """Look the authority up afresh at the next `authority()` (after a call failed with ActorDiedError:
    an actor killed for good is re-created from the state in the GCS)."""
    with _handles_lock:
        _dead.update(_id(handle) for handle in _handles.values())
        _handles.clear()
