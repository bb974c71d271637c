"""LeaseKeeper: one thread per process keeps every lease this process holds alive.

Each round (every ttl/4) it renews all of them in one `renew` call. A driver holds a job's lease from
its request until the task running it attaches it to a node; from then on the node's worker holds it
and the authority ignores the driver's renewals of it (which go on, harmlessly: a `lost` answer may
also mean the request has not reached the authority yet). The driver watches the job's result ref
and, when it is ready, releases the lease unless a node holds it (`unbound_only`: the task released
it itself, or its node failed and it must lapse). A worker renews the leases of the jobs it runs
and tells each job's JobControl the time by which it must end should no renewal get through
(`node_deadline`): `lease_ttl` after the renewal was *sent*, less the time the node needs to end the
job (`room`: grace, and the fork-server's slack should the supervisor be frozen), but at least half
the ttl; the fork-server kills it `room` − 1 s later should the supervisor be frozen. The authority
counts from when it *received* the renewal and frees the share only after max(ttl, ttl/2 + room)
(Authority._span, the room told at attach): the node has always ended the job by then. A renewal
the authority answers `lost` ends the job at once.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .actor import forget
from .options import _ray

ROUND_SHARE = 4  # renew every ttl / ROUND_SHARE
RETRY = 0.25  # seconds before the next try after a round that could not renew


@dataclass
class Held:
    """One lease this process keeps: `until` (driver) a ref whose readiness ends it; `on_renewed`
    (worker) gets each new node-side deadline, `on_lost` the reason when the authority says it is gone."""

    ttl: float
    until: Any = None
    on_renewed: Callable[[float], None] | None = None
    on_lost: Callable[[str], None] | None = None
    room: float = 0.0


class LeaseKeeper:
    """Renews the leases of one holder (this process) against the authority `handle()` returns."""

    def __init__(self, handle: Callable[[], Any], holder: str) -> None:
        self._handle, self.holder = handle, holder
        self._held: dict[str, Held] = {}
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def keep(self, lease_id: str, held: Held) -> None:
        with self._cv:
            self._held[lease_id] = held
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="tsbx-lease-keeper", daemon=True)
                self._thread.start()
            self._cv.notify()

    def drop(self, lease_id: str, release: bool = True, unbound_only: bool = False) -> None:
        """Stop keeping `lease_id`; `release` it at the authority (without waiting for the answer;
        `unbound_only`: see Authority.release)."""
        with self._cv:
            self._held.pop(lease_id, None)
        if release:
            self._release([lease_id], unbound_only)

    def _release(self, ids: list[str], unbound_only: bool) -> None:
        try:
            self._handle().release.remote(ids, unbound_only)
        except Exception:  # noqa: BLE001 - Ray gone: the lease lapses at the authority after its ttl
            pass

    def _loop(self) -> None:
        while True:
            with self._cv:
                if not self._held:
                    self._thread = None
                    return
                period = min(h.ttl for h in self._held.values()) / ROUND_SHARE
            try:
                renewed = self._round(period)
            except Exception:  # noqa: BLE001 - Ray shut down under us: nothing left to keep
                with self._cv:
                    self._held.clear()
                    self._thread = None
                return
            with self._cv:
                self._cv.wait(period if renewed else min(period, RETRY))

    def _round(self, period: float) -> bool:
        """Release the leases whose job ended; renew the rest in one call (at most `period` waited).
        False when the authority could not be reached (the caller tries again soon)."""
        ray = _ray()
        with self._cv:
            held = dict(self._held)
        watched = {id(h.until): lease for lease, h in held.items() if h.until is not None}
        refs = [h.until for h in held.values() if h.until is not None]
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            ended = [watched[id(ref)] for ref in ready if id(ref) in watched]
            for lease in ended:
                self.drop(lease, release=True, unbound_only=True)
                held.pop(lease, None)
        renew = list(held)
        if not renew:
            return True
        sent = time.monotonic()
        try:
            answer = self._handle().renew.remote(renew, self.holder).future().result(timeout=period)  # not ray.get: see task._attach
        except Exception as err:  # noqa: BLE001 - not renewed this round: the node-side deadlines stay where they are
            if isinstance(err, ray.exceptions.RayActorError):
                forget()  # killed for good: the next round finds its successor (restored from the GCS)
            return False
        lost = set(answer.get("lost", []))
        for lease in renew:
            h = held[lease]
            h.ttl = answer.get("ttl", h.ttl)
            if lease in lost and h.on_lost is not None:  # a worker's: the job must end
                h.on_lost("the quota authority no longer holds the job's lease (it lapsed or was released)")
                self.drop(lease, release=False)
            elif lease not in lost and h.on_renewed is not None:
                h.on_renewed(node_deadline(sent, h.ttl, h.room))
        return True


def node_deadline(sent: float, ttl: float, room: float) -> float:
    """When the node must start ending a job whose last renewal was sent at `sent` (time.monotonic()):
    before the authority lets the lease lapse (Authority._span) by the node's `room`, or half the ttl."""
    return sent + ttl - min(ttl / 2, room)


_keepers: dict[str, LeaseKeeper] = {}
_keepers_lock = threading.Lock()


def keeper(handle: Callable[[], Any]) -> LeaseKeeper:
    """This process's LeaseKeeper (its holder id: the process's Ray worker id (a driver has one too) and pid)."""
    ctx = _ray().get_runtime_context()
    key = ctx.gcs_address
    with _keepers_lock:
        found = _keepers.get(key)
        if found is None:
            found = _keepers[key] = LeaseKeeper(handle, f"{ctx.get_worker_id()}:{os.getpid()}")
        return found
