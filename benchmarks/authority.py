"""Bench rows: the cluster quota authority (sandbox.ray.authority) under 200 simulated executors.

One Authority on this process's event loop persists to the GCS key-value store of a local
`ray.init(num_cpus=1)` bound to loopback (a FileStore in the bench's state dir if Ray's KV cannot be
used: the row says so). 200 executors, in-process asyncio clients, each loop acquire → attach →
release over and over for jobs of 20 tenants (10 executors each) on 20 nodes of 64 GiB (10 each):
jobs of 1-4 GiB, some with 1 GiB of GPU memory. Tenants t0-t17 have quotas that fit their 10
executors (max_concurrent 10, 40 GiB); t18 and t19 have max_concurrent 6, so their jobs also wait
for quota. Every call replies only once its change is saved to the store (group commit).

admissions/s: completed acquire → attach → release cycles per second, all tenants, over WINDOW s
after WARMUP s. Admission latency: from the acquire call to the attach reply (both saved), for jobs
of the tenants whose quotas fit (t0-t17): the authority's cost with persistence, without quota
waits.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from pathlib import Path

from sandbox.ray.authority import Authority
from sandbox.ray.store import FileStore, GcsStore

EXECUTORS, TENANTS, NODES, PER_TENANT = 200, 20, 20, 10
TIGHT = {"t18", "t19"}  # tenants whose max_concurrent (6) is below their executors' (10)
WARMUP, WINDOW = 1.0, 5.0
GiB = 1 << 30


def _store(state: Path) -> tuple[object, str, object]:
    """The GCS KV store of a local Ray (and Ray, to shut down), else a FileStore and why."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read at import: Ray on loopback
    try:
        import ray
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        store = GcsStore(key=f"bench-{uuid.uuid4().hex}")
        store.save(b"{}")
        return store, "GCS KV store", ray
    except Exception as err:  # noqa: BLE001 - the row runs on, and says which store it measured
        return FileStore(state / "authority.json"), f"FileStore: Ray's KV unusable ({type(err).__name__})", None


async def _measure(store) -> tuple[int, list[float], float, int]:
    """Cycles completed and admission latencies (ms) in the window, its length, and saves."""
    store.save(b'{"format": 1, "epoch": 0, "leases": [], "waiters": [], "nodes": {}}')
    authority = Authority(store, ttl=30.0)
    await authority.start()
    counting = {"on": False, "cycles": 0}
    latencies: list[float] = []
    saves = [0]
    save = store.save

    def counted(data: bytes) -> None:
        save(data)
        saves[0] += counting["on"]
    store.save = counted

    async def executor(i: int, stop: asyncio.Event) -> None:
        rng = random.Random(i)
        tenant, node = f"t{i % TENANTS}", f"n{(i // PER_TENANT) % NODES}"
        quotas = {"max_concurrent": 6 if tenant in TIGHT else PER_TENANT, "memory_quota": 40 * GiB,
                  "gpu_memory_quota": 10 * GiB}
        job = 0
        while not stop.is_set():
            lease_id, job = f"e{i}-{job}", job + 1
            memory, gpu = rng.randint(1, 4) * GiB, GiB if rng.random() < 0.2 else 0
            t = time.perf_counter()
            granted = await authority.acquire(lease_id, tenant, f"driver{i}", memory, gpu, quotas)
            attached = await authority.attach(lease_id, node, f"worker-{node}", node_memory=64 * GiB)
            elapsed = (time.perf_counter() - t) * 1000
            assert "granted" in granted and "attached" in attached, (granted, attached)
            await authority.release([lease_id])
            if counting["on"]:
                counting["cycles"] += 1
                if tenant not in TIGHT:
                    latencies.append(elapsed)

    stop = asyncio.Event()
    tasks = [asyncio.create_task(executor(i, stop)) for i in range(EXECUTORS)]
    await asyncio.sleep(WARMUP)
    counting["on"], t = True, time.perf_counter()
    await asyncio.sleep(WINDOW)
    counting["on"], window = False, time.perf_counter() - t
    stop.set()
    await asyncio.gather(*tasks)
    await authority.close()
    assert authority.usage()["leases"] == 0 and json.loads(store.load())["leases"] == []  # the store has the end
    return counting["cycles"], latencies, window, saves[0]


def authority_rows(bench) -> None:
    store, label, ray = _store(Path(bench.state))
    try:
        cycles, latencies, window, saves = asyncio.run(_measure(store))
    finally:
        if ray is not None:
            ray.shutdown()
    ordered = sorted(latencies)
    rate, p99 = cycles / window, ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    bench.add(f"authority admissions/s, {EXECUTORS} simulated executors (in-process asyncio clients, {label}; "
              f"{saves / window:.0f} saves/s)", None, rate, "≥ 2000", rate >= 2000, "/s")
    bench.add("authority admission p99, same: acquire call → attach reply, tenants within quota (ms)",
              latencies, p99, "p99 ≤ 20", p99 <= 20, "ms")
