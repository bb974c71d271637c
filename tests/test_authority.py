"""The cluster quota authority's core (sandbox.ray.authority), pure asyncio: quotas, queues, nodes,
expiry, group-committed persistence and restart; and the GCS store on a real local Ray."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import selectors
import threading

import pytest

from sandbox.ray.authority import Authority
from sandbox.ray.store import FileStore, GcsStore, MemoryStore

GiB = 1 << 30


def quotas(max_concurrent=None, memory_quota=None, gpu_memory_quota=None) -> dict:
    return {"max_concurrent": max_concurrent, "memory_quota": memory_quota, "gpu_memory_quota": gpu_memory_quota}


class CountingSelector(selectors.DefaultSelector):
    """Counts the event loop's wake-ups: a loop that polls wakes up all the time."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def select(self, timeout=None):
        self.calls += 1
        return super().select(timeout)


def run(test, timeout: float = 5.0):
    """Run `test(selector)` on a fresh event loop whose selector counts wake-ups."""
    selector = CountingSelector()
    loop = asyncio.SelectorEventLoop(selector)
    try:
        return loop.run_until_complete(asyncio.wait_for(test(selector), timeout))
    finally:
        loop.close()


@contextlib.asynccontextmanager
async def started(store=None, **kwargs):
    authority = Authority(store if store is not None else MemoryStore(), **kwargs)
    await authority.start()
    try:
        yield authority
    finally:
        await authority.close()


async def pending(coro) -> asyncio.Task:
    """Start a call and check it waits."""
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(0.05)
    assert not task.done(), task.result()
    return task


async def done(task: asyncio.Task) -> dict:
    return await asyncio.wait_for(task, 2)


def bound(answer: dict) -> dict:
    """An attach's answer less `waited` (seconds, measured)."""
    return {k: v for k, v in answer.items() if k != "waited"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_quota_holds_and_a_release_admits_the_next():
    async def body(_):
        async with started() as a:
            q = quotas(max_concurrent=2, memory_quota=10 * GiB, gpu_memory_quota=4 * GiB)
            assert await a.acquire("a1", "t", "d", GiB, 0, q) == {"granted": "a1", "ttl": 30.0}
            assert await a.acquire("a2", "t", "d", GiB, 0, q) == {"granted": "a2", "ttl": 30.0}
            third = await pending(a.acquire("a3", "t", "d", GiB, 0, q))  # max_concurrent
            await a.release(["a1"])
            assert await done(third) == {"granted": "a3", "ttl": 30.0}
            await a.release(["a2", "a3"])
            assert await a.acquire("m1", "t", "d", 6 * GiB, 0, q) == {"granted": "m1", "ttl": 30.0}
            big = await pending(a.acquire("m2", "t", "d", 5 * GiB, 0, q))  # memory_quota
            await a.release(["m1"])
            assert "granted" in await done(big)
            assert await a.acquire("g1", "t", "d", 0, 3 * GiB, q) == {"granted": "g1", "ttl": 30.0}
            gpu = await pending(a.acquire("g2", "t", "d", 0, 2 * GiB, q))  # gpu_memory_quota (m2 holds a slot)
            assert a.usage()["tenants"]["t"] == {"running": 2, "memory": 5 * GiB, "gpu_memory": 3 * GiB, "waiting": 1}
            await a.release(["g1"])
            assert "granted" in await done(gpu)
    run(body)


def test_waiters_wake_by_priority_then_first_come_without_polling():
    async def body(selector):
        async with started() as a:
            q = quotas(max_concurrent=1)
            await a.acquire("held", "t", "d", 0, 0, q)
            order = []

            async def wait(lease_id, priority):
                await a.acquire(lease_id, "t", "d", 0, 0, q, priority)
                order.append(lease_id)
            tasks = [await pending(wait(lease_id, p)) for lease_id, p in
                     [("low1", 0), ("high1", 5), ("low2", 0), ("high2", 5)]]
            before = selector.calls
            await asyncio.sleep(0.5)  # four waiters blocked: the loop sleeps
            assert selector.calls - before <= 3
            for expected in ["held", "high1", "high2", "low1"]:
                await a.release([expected])
                await asyncio.sleep(0.05)
            assert order == ["high1", "high2", "low1", "low2"]
            await asyncio.gather(*tasks)
    run(body)


def test_one_tenants_blocked_head_never_blocks_another_tenant():
    async def body(_):
        async with started() as a:
            await a.acquire("x1", "x", "d", 8 * GiB, 0, quotas(memory_quota=10 * GiB))
            blocked = await pending(a.acquire("x2", "x", "d", 4 * GiB, 0, quotas(memory_quota=10 * GiB)))
            assert await a.acquire("y1", "y", "d", 4 * GiB, 0, quotas(memory_quota=10 * GiB)) == \
                {"granted": "y1", "ttl": 30.0}
            # behind its own tenant's head even when it would fit: first come within a tenant
            small = await pending(a.acquire("x3", "x", "d", GiB, 0, quotas(memory_quota=10 * GiB)))
            await a.release(["x1"])
            assert "granted" in await done(blocked) and "granted" in await done(small)
    run(body)


def test_a_demand_that_can_never_fit_is_refused_at_once():
    async def body(_):
        async with started() as a:
            for args, word in [((2 * GiB, 0, quotas(memory_quota=GiB)), "memory_quota"),
                               ((0, 2 * GiB, quotas(gpu_memory_quota=GiB)), "gpu_memory_quota"),
                               ((0, 0, quotas(max_concurrent=0)), "max_concurrent")]:
                answer = await a.acquire("r", "t", "d", *args)
                assert list(answer) == ["refused"] and word in answer["refused"]
            assert a.usage()["leases"] == 0 and a.usage()["waiting"] == 0
    run(body)


def test_malformed_demands_are_refused_and_never_count_against_a_quota():
    async def body(_):
        async with started() as a:
            q = quotas(max_concurrent=2, memory_quota=4 * GiB)
            bad = [(("n1", "t", "d", -8 * GiB, 0, q), "memory: "), (("n2", "t", "d", 0, -GiB, q), "gpu_memory: "),
                   (("n3", "t", "d", True, 0, q), "memory: "), (("n4", "t", "d", 1.5, 0, q), "memory: "),
                   (("n5", "t", "d", 0, 0, {"max_concurrent": "9"}), "max_concurrent: "),
                   (("n6", "t", "d", 0, 0, [1]), "quotas: "), ((7, "t", "d", 0, 0, q), "lease_id: "),
                   (("n8", None, "d", 0, 0, q), "tenant: "), (("n9", "t", "d", 0, 0, q, "high"), "priority: ")]
            for args, word in bad:
                answer = await a.acquire(*args)
                assert list(answer) == ["refused"] and answer["refused"].startswith(word), answer
            assert a.usage()["leases"] == 0 and a.usage()["tenants"] == {}
            await a.acquire("ok", "t", "d", GiB, 0, q)
            for node_memory in (-GiB, "16GiB", 0):
                assert "node_memory: " in (await a.attach("ok", "n", "w", node_memory=node_memory))["lost"]
            assert a.usage()["nodes"] == {}
            assert "lease_id: " in (await a.attach(["ok"], "n", "w"))["lost"]
            assert await a.renew(["ok", ["ok"]], "d") == {"lost": [["ok"]]}
            await a.release([["ok"], {"ok": 1}])
            assert a.usage()["leases"] == 1
    run(body)


def test_an_unlimited_job_reserves_its_whole_node_at_attach():
    async def body(_):
        async with started() as a:
            q = quotas(memory_quota=40 * GiB)
            await a.acquire("small", "t", "d", 2 * GiB, 0, q)
            assert await a.acquire("whole", "t", "d", None, 0, q) == {"granted": "whole", "ttl": 30.0}
            assert a.usage()["tenants"]["t"]["memory"] == 2 * GiB  # unlimited counts 0 until attached
            assert bound(await a.attach("small", "n1", "w1", node_memory=16 * GiB)) == {"attached": "n1", "ttl": 30.0}
            whole = await pending(a.attach("whole", "n1", "w1", node_memory=16 * GiB))
            assert a.usage()["nodes"]["n1"]["waiting"] == 1
            await a.release(["small"])
            assert bound(await done(whole)) == {"attached": "n1", "ttl": 30.0}
            assert a.usage()["nodes"]["n1"]["memory_reserved"] == 16 * GiB
            assert a.usage()["tenants"]["t"]["memory"] == 16 * GiB
            await a.acquire("next", "t", "d", GiB, 0, q)
            assert "granted" in await a.acquire("other", "u", "d", GiB, 0, quotas())
            await pending(a.attach("other", "n1", "w1", node_memory=16 * GiB))  # the node is reserved
            # the tenant's quota counts the node's memory: a second unlimited job on a 32 GiB node waits
            await a.acquire("whole2", "t", "d", None, 0, q)
            big = await pending(a.attach("whole2", "n2", "w2", node_memory=32 * GiB))
            assert a.usage()["nodes"]["n2"]["memory_reserved"] == 0
            await a.release(["whole"])
            assert bound(await done(big)) == {"attached": "n2", "ttl": 30.0}
            # one that can never fit the tenant's quota is lost at once
            await a.acquire("whole3", "v", "d", None, 0, quotas(memory_quota=8 * GiB))
            assert "memory_quota" in (await a.attach("whole3", "n3", "w", node_memory=16 * GiB))["lost"]
    run(body)


def test_an_unlimited_job_attached_no_longer_holds_back_its_tenants_waiters():
    async def body(_):
        async with started() as a:
            q = quotas(memory_quota=21 * GiB)
            await a.acquire("a", "t", "d", 4 * GiB, 0, q)
            await a.acquire("u", "t", "d", None, 0, q)
            await a.attach("a", "n1", "w", node_memory=8 * GiB)
            held = await pending(a.attach("u", "n2", "w", node_memory=18 * GiB))  # 4 + 18 > 21
            await a.acquire("b", "v", "d", GiB, 0, quotas())
            waits = await pending(a.attach("b", "n2", "w", node_memory=16 * GiB))  # the node has 16 GiB now
            assert bound(await done(held)) == {"attached": "n2", "ttl": 30.0}
            assert await a.acquire("c", "t", "d", GiB, 0, q) == {"granted": "c", "ttl": 30.0}  # 4 + 16 + 1 <= 21
            waits.cancel()
    run(body)


def test_two_nodes_are_independent():
    async def body(_):
        async with started() as a:
            for i in range(4):
                await a.acquire(f"j{i}", "t", "d", 6 * GiB, 0, quotas())
            assert "attached" in await a.attach("j0", "n1", "w1", node_memory=8 * GiB)
            waits = await pending(a.attach("j1", "n1", "w1", node_memory=8 * GiB))
            assert bound(await a.attach("j2", "n2", "w2", node_memory=8 * GiB)) == {"attached": "n2", "ttl": 30.0}
            assert "exceeds node n3" in (await a.attach("j3", "n3", "w3", node_memory=4 * GiB))["lost"]
            await a.release(["j2"])
            assert not waits.done()
            await a.release(["j0"])
            assert bound(await done(waits)) == {"attached": "n1", "ttl": 30.0}
    run(body)


def test_only_the_holder_renews_and_after_attach_only_the_node_worker():
    async def body(_):
        clock = FakeClock()
        async with started(ttl=0.4, clock=clock) as a:
            await a.acquire("l", "t", "driver", GiB, 0, quotas())
            clock.now += 0.3
            assert await a.renew(["l", "unknown"], "intruder") == {"lost": ["l", "unknown"]}
            assert await a.renew(["l"], "driver") == {"lost": []}
            await a.attach("l", "n", "worker", node_memory=4 * GiB)
            assert await a.renew(["l"], "driver") == {"lost": ["l"]}
            clock.now += 0.3
            assert await a.renew(["l"], "worker") == {"lost": []}
            clock.now += 0.3
            await asyncio.sleep(0.25)  # an expiry sweep: renewed 0.3 s ago, ttl 0.4 s
            assert a.usage()["leases"] == 1
            clock.now += 0.3  # the intruder's renewal did not count
            await asyncio.sleep(0.25)
            assert a.usage()["leases"] == 0 and "expired" in a.ended("l")
    run(body)


def test_expiry_frees_the_lease_and_wakes_the_next_and_drops_silent_waiters():
    async def body(_):
        clock = FakeClock()
        async with started(ttl=0.4, clock=clock) as a:
            q = quotas(max_concurrent=1)
            await a.acquire("silent", "t", "d1", GiB, 0, q)
            nxt = await pending(a.acquire("next", "t", "d2", GiB, 0, q))
            clock.now += 0.3
            await a.renew(["next"], "d2")
            clock.now += 0.2  # silent is past its ttl, next is not
            assert await done(nxt) == {"granted": "next", "ttl": 0.4}
            assert "expired" in a.ended("silent")
            assert "expired" in (await a.attach("silent", "n", "w", node_memory=GiB))["lost"]
            quiet = await pending(a.acquire("quiet", "t", "d3", GiB, 0, q))
            await a.renew(["next"], "d2")
            clock.now += 0.5
            assert "expired while waiting" in (await done(quiet))["lost"]
    run(body)


def test_a_node_that_vanishes_loses_its_attach_waiters_at_once_and_its_leases_lapse():
    """A node gone from the node table may only be cut off, its jobs still running until their
    lease's deadline: its leases are freed when they lapse (after ttl/2 + its room here), not sooner."""
    async def body(_):
        live, clock = {"n1": 8 * GiB, "n2": 8 * GiB}, FakeClock()
        async with started(nodes=lambda: dict(live), refresh=0.05, ttl=0.4, clock=clock) as a:
            q = quotas(max_concurrent=2)
            await a.acquire("on1", "t", "d", 6 * GiB, 0, q)
            await a.acquire("on2", "t", "d", 6 * GiB, 0, q)
            await a.attach("on1", "n1", "w1")
            assert bound(await a.attach("on2", "n2", "w2", room=1.0)) == {"attached": "n2", "ttl": 0.4}
            queued = await pending(a.acquire("queued", "t", "d", 6 * GiB, 0, q))
            await a.acquire("x", "u", "d", 6 * GiB, 0, q)
            on_n2 = await pending(a.attach("x", "n2", "wx"))
            del live["n2"]
            assert (await done(on_n2))["lost"] == "node n2 is gone"  # an attach waiter's job never started
            assert set(a.usage()["nodes"]) == {"n1"}
            for step in (0.5, 0.9):  # past the ttl, then past on2's span (0.4 / 2 + 1.0 s)
                await asyncio.sleep(0.2)
                assert not queued.done() and a.usage()["tenants"]["t"]["running"] == 2
                clock.now += step
                await a.renew(["on1"], "w1")
                await a.renew(["queued", "x"], "d")
            assert "granted" in await done(queued)
            assert "expired" in a.ended("on2") and a.usage()["tenants"]["t"]["running"] == 2
            assert "not a live node" in (await a.attach("x", "n2", "wx"))["lost"]
            live["n3"] = 8 * GiB  # a node not seen yet is asked for at once
            assert bound(await a.attach("x", "n3", "wx")) == {"attached": "n3", "ttl": 0.4}
    run(body)


def test_a_restarted_authority_loses_no_lease_and_overbooks_nothing():
    async def body(_):
        store = MemoryStore()
        a = Authority(store)
        await a.start()
        assert a.usage()["epoch"] == 0
        q = quotas(max_concurrent=2, memory_quota=8 * GiB)
        await a.acquire("l1", "t", "d", 4 * GiB, 0, q)
        await a.attach("l1", "n", "w", node_memory=8 * GiB)
        await a.acquire("l2", "t", "d", None, 0, q)
        waiter = await pending(a.acquire("l3", "t", "d", 4 * GiB, 0, q, priority=3))
        attach = await pending(a.attach("l2", "n", "w2", node_memory=8 * GiB))
        before = a.usage()
        waiter.cancel(), attach.cancel()  # the old authority dies with its callers' calls
        del a  # no close: a killed actor does not tidy up
        async with started(store) as b:
            after = b.usage()
            assert after["epoch"] == 1 and after["leases"] == 2 and after["waiting"] == 0  # waiters: not saved
            assert {k: after["tenants"]["t"][k] for k in ("running", "memory", "gpu_memory")} == \
                {k: before["tenants"]["t"][k] for k in ("running", "memory", "gpu_memory")}
            assert after["nodes"]["n"]["memory_reserved"] == 4 * GiB
            # callers retry by lease id: the grant is the same, the waiter is queued again
            assert await b.acquire("l1", "t", "d", 4 * GiB, 0, q) == {"granted": "l1", "ttl": 30.0}
            assert bound(await b.attach("l1", "n", "w")) == {"attached": "n", "ttl": 30.0}
            again = await pending(b.acquire("l3", "t", "d", 4 * GiB, 0, q, priority=3))
            whole = await pending(b.attach("l2", "n", "w2"))  # l1 holds half the node
            await b.release(["l1"])
            assert bound(await done(whole)) == {"attached": "n", "ttl": 30.0}
            assert not again.done()  # the tenant's 8 GiB are l2's whole node now
            await b.release(["l2"])
            assert "granted" in await done(again)
        async with started(store) as c:
            assert c.usage()["epoch"] == 2 and c.usage()["leases"] == 1
    run(body)


def test_restored_leases_get_a_fresh_ttl_and_expire_if_nobody_comes_back():
    async def body(_):
        store, clock = MemoryStore(), FakeClock()
        async with started(store, ttl=0.4, clock=clock) as a:
            await a.acquire("l", "t", "d", GiB, 0, quotas())
        clock.now += 60  # the authority was down for a minute
        async with started(store, ttl=0.4, clock=clock) as b:
            await asyncio.sleep(0.25)
            assert b.usage()["leases"] == 1
            clock.now += 0.5
            await asyncio.sleep(0.25)
            assert b.usage()["leases"] == 0 and "expired" in b.ended("l")
    run(body)


def test_leases_of_a_node_that_died_while_the_authority_was_down_lapse():
    async def body(_):
        store, live, clock = MemoryStore(), {"n1": 8 * GiB, "n2": 8 * GiB}, FakeClock()
        async with started(store, nodes=lambda: dict(live), ttl=0.4, clock=clock) as a:
            for lease_id, node in (("l1", "n1"), ("l2", "n2")):
                await a.acquire(lease_id, "t", "d", 6 * GiB, 0, quotas())
                await a.attach(lease_id, node, "w")
        del live["n2"]
        async with started(store, nodes=lambda: dict(live), ttl=0.4, clock=clock) as b:
            assert b.usage()["leases"] == 2 and set(b.usage()["nodes"]) == {"n1"}
            clock.now += 0.5
            await b.renew(["l1"], "w")
            await asyncio.sleep(0.25)
            assert b.usage()["leases"] == 1 and "expired" in b.ended("l2")
            assert b.usage()["nodes"] == {"n1": {"memory_total": 8 * GiB, "memory_reserved": 6 * GiB, "leases": 1,
                                                 "waiting": 0}}
    run(body)


class GatedStore(MemoryStore):
    """A store whose saves block until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()

    def save(self, data: bytes) -> None:
        assert self.gate.wait(5)
        super().save(data)


def test_replies_wait_for_the_save_that_covers_them():
    async def body(_):
        store = GatedStore()
        async with started(store) as a:
            store.gate.clear()
            acquire = await pending(a.acquire("l", "t", "d", GiB, 0, quotas()))
            assert a.usage()["leases"] == 1  # granted, not yet durable
            store.gate.set()
            assert await done(acquire) == {"granted": "l", "ttl": 30.0}
            assert [r["lease_id"] for r in json.loads(store.data)["leases"]] == ["l"]
            store.gate.clear()
            attach = await pending(a.attach("l", "n", "w", node_memory=GiB))
            store.gate.set()
            assert bound(await done(attach)) == {"attached": "n", "ttl": 30.0}
            assert json.loads(store.data)["leases"][0]["node"] == "n"
            store.gate.clear()
            release = await pending(a.release(["l"]))
            others = [asyncio.ensure_future(a.acquire(f"b{i}", "t", "d", GiB, 0, quotas())) for i in range(20)]
            saves = store.saves
            store.gate.set()
            await done(release)
            await asyncio.gather(*others)
            assert store.saves - saves <= 3  # 21 changes, batched
            assert sorted(r["lease_id"] for r in json.loads(store.data)["leases"]) == sorted(f"b{i}" for i in range(20))
    run(body)


class FlakyStore(MemoryStore):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def save(self, data: bytes) -> None:
        if self.failures > 0 and self.data is not None:
            self.failures -= 1
            raise ConnectionError("GCS unavailable")
        super().save(data)


def test_a_failing_save_is_retried_and_no_reply_comes_before_it_succeeds():
    async def body(_):
        store = FlakyStore(failures=3)
        async with started(store) as a:
            acquire = await pending(a.acquire("l", "t", "d", GiB, 0, quotas()))  # backoff 0.05 + 0.1 + 0.2 s
            assert await done(acquire) == {"granted": "l", "ttl": 30.0}
            assert store.failures == 0 and "\"l\"" in store.data.decode()
    run(body)


def test_state_that_cannot_be_read_is_never_replaced_by_an_empty_start(tmp_path):
    async def body(_):
        for store in (MemoryStore(b'{"format": 99}'), MemoryStore(b"not json"), FileStore(tmp_path)):
            with pytest.raises(Exception):
                await Authority(store).start()
    run(body)
    assert os.listdir(tmp_path) == []


def test_acquire_attach_and_release_are_idempotent():
    async def body(_):
        async with started() as a:
            q = quotas(max_concurrent=1)
            first = await a.acquire("l", "t", "d", GiB, 0, q)
            assert await a.acquire("l", "t", "d", GiB, 0, q) == first
            twice = [await pending(a.acquire("w", "t", "d", GiB, 0, q)) for _ in range(2)]
            assert a.usage()["tenants"]["t"] == {"running": 1, "memory": GiB, "gpu_memory": 0, "waiting": 1}
            assert bound(await a.attach("l", "n", "w", node_memory=4 * GiB)) == bound(await a.attach("l", "n", "w"))
            assert a.usage()["nodes"]["n"]["memory_reserved"] == GiB
            assert "attached to node n" in (await a.attach("l", "m", "w", node_memory=4 * GiB))["lost"]
            await a.release(["l"])
            await a.release(["l", "never"])
            assert [await done(t) for t in twice] == [{"granted": "w", "ttl": 30.0}] * 2
            assert a.usage()["leases"] == 1 and a.usage()["nodes"]["n"]["memory_reserved"] == 0
            assert await a.acquire("l", "t", "d", GiB, 0, q) == {"lost": "released"}  # a late retry
            withdrawn = await pending(a.acquire("x", "t", "d", GiB, 0, q))
            await a.release(["x"])
            await a.release(["x"])
            assert await done(withdrawn) == {"lost": "released"} and a.usage()["waiting"] == 0
    run(body)


def test_file_store_round_trip(tmp_path):
    store = FileStore(tmp_path / "authority.json")
    assert store.load() is None
    store.save(b"one")
    store.save(b"two")
    assert store.load() == b"two" and os.listdir(tmp_path) == ["authority.json"]


@pytest.mark.slow
def test_gcs_store_round_trip_on_a_local_ray(ray_home):
    ray = pytest.importorskip("ray")
    saved = os.environ.get("HOME")
    os.environ["HOME"] = str(ray_home)  # loopback: see conftest
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        store = GcsStore(key="test-authority")
        assert store.load() is None
        store.save(b"state one")
        store.save(b"state two")
        assert store.load() == b"state two"
        assert GcsStore(key="test-authority", namespace="elsewhere").load() is None

        async def body(_):
            async with started(store) as a:
                assert a.usage()["epoch"] == 5
                await a.acquire("l", "t", "d", GiB, 0, quotas())
            async with started(GcsStore(key="test-authority")) as b:
                assert b.usage()["leases"] == 1
        store.save(json.dumps({"format": 1, "epoch": 4, "leases": [], "waiters": [], "nodes": {}}).encode())
        run(body)
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = saved


def test_a_driver_s_release_leaves_a_lease_its_node_holds_to_lapse():
    """A driver whose task failed cannot know the job ended on its node: `unbound_only` frees a
    waiter or an unattached lease, never an attached one (its node ends the job, then it lapses)."""
    async def body(_):
        async with started() as a:
            q = quotas(max_concurrent=3)
            for lease_id in ("bound", "unbound"):
                await a.acquire(lease_id, "t", "d", GiB, 0, q)
            await a.attach("bound", "n", "w", node_memory=4 * GiB)
            await a.release(["bound", "unbound"], unbound_only=True)
            assert a.usage()["leases"] == 1 and a.ended("unbound") == "released" and a.ended("bound") is None
            await a.release(["bound"])  # its task: the job has ended
            assert a.usage()["leases"] == 0
    run(body)


def test_one_tenant_cannot_take_or_join_another_tenant_s_lease_id():
    async def body(_):
        async with started() as a:
            q = quotas(max_concurrent=1)
            await a.acquire("l", "t", "d", GiB, 0, q)
            waiting = await pending(a.acquire("w", "t", "d", GiB, 0, q))
            for lease_id in ("l", "w"):
                assert "another tenant" in (await a.acquire(lease_id, "u", "d", GiB, 0, q))["refused"]
            assert a.usage()["tenants"]["t"]["running"] == 1 and not waiting.done()
            waiting.cancel()
    run(body)


def test_attach_renews_the_lease_says_how_long_it_waited_and_the_node_s_room_sets_its_span():
    async def body(_):
        clock = FakeClock()
        async with started(ttl=0.4, clock=clock) as a:
            await a.acquire("whole", "t", "d", None, 0, quotas())
            for bad in (-1, float("nan"), "5", True, 1e9):
                assert "room" in (await a.attach("whole", "n", "w", node_memory=GiB, room=bad))["lost"]
            await a.attach("whole", "n", "w", node_memory=4 * GiB)
            await a.acquire("l", "t", "d", GiB, 0, quotas())
            later = await pending(a.attach("l", "n", "w2", node_memory=4 * GiB, room=1.0))
            clock.now += 0.3
            await a.renew(["whole"], "w")
            await a.release(["whole"])
            answer = await done(later)
            assert answer["attached"] == "n" and abs(answer["waited"] - 0.3) < 1e-9
            clock.now += 1.1  # past the ttl, within ttl / 2 + room = 1.2 s of the attach's answer
            await asyncio.sleep(0.25)
            assert a.usage()["leases"] == 1
            assert await a.renew(["l"], "w2") == {"lost": []}
            clock.now += 1.3
            await asyncio.sleep(0.25)
            assert a.usage()["leases"] == 0 and "not renewed within 1.2 s" in a.ended("l")
    run(body)


def test_an_authority_whose_start_failed_starts_again_at_the_next_call(monkeypatch):
    """A start that failed (the GCS unreadable for a moment) is not kept: the next call tries again."""
    from sandbox.ray import actor
    tries = []

    async def start(self):
        tries.append(1)
        if len(tries) == 1:
            raise ConnectionError("GCS unavailable")
        core = Authority(MemoryStore())
        await core.start()
        self._core = core
    monkeypatch.setattr(actor.AuthorityActor, "_start", start)

    async def body(_):
        a = actor.AuthorityActor(30.0)
        with pytest.raises(ConnectionError):
            await a.usage()
        assert (await a.usage())["leases"] == 0 and len(tries) == 2
        await a._core.close()
    run(body)


def test_the_previous_format_s_state_is_restored_its_waiters_queued_again_by_their_callers():
    async def body(_):
        lease = {"lease_id": "l", "tenant": "t", "holder": "w", "memory": GiB, "gpu_memory": 0,
                 "quotas": quotas(max_concurrent=1), "priority": 0, "seq": 0, "node": "n", "reserved": GiB}
        waiter = {**lease, "lease_id": "w", "seq": 1, "node": None, "reserved": 0}
        store = MemoryStore(json.dumps({"format": 1, "epoch": 3, "leases": [lease], "waiters": [waiter],
                                        "nodes": {"n": 4 * GiB}}).encode())
        async with started(store) as a:
            assert a.usage()["epoch"] == 4 and a.usage()["leases"] == 1 and a.usage()["waiting"] == 0
            again = await pending(a.acquire("w", "t", "d", GiB, 0, quotas(max_concurrent=1)))
            await a.release(["l"])
            assert "granted" in await done(again)
        assert json.loads(store.data)["format"] == 2
    run(body)
