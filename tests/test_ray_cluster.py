"""The cluster-wide quota authority on a real multi-node Ray cluster (`ray.cluster_utils.Cluster`: a
head and three worker nodes, every process on 127.0.0.1): tenant caps across nodes and entry points,
and a verdict and a freed share for every failure a cluster has (a node removed, the authority killed
and restarted or killed for good, a node frozen)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

ray = pytest.importorskip("ray")

from sandbox import JobSpec, Limits, Policy, Verdict  # noqa: E402
from sandbox import ray as sray  # noqa: E402
from sandbox.core.limits import GiB, Cluster, Settings, Tenant  # noqa: E402

from .conftest import alive  # noqa: E402

pytestmark = pytest.mark.slow
TTL = 10.0
NAP = "import sys, time\ntime.sleep(float(sys.argv[1]))\n"
NODE = {"num_cpus": 2, "memory": 2 * GiB}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, ray_home):
    from ray.cluster_utils import Cluster as RayCluster
    home = tmp_path_factory.mktemp("raycluster")
    saved = {k: os.environ.get(k) for k in ("HOME", "XDG_STATE_HOME")}
    os.environ.update(HOME=str(ray_home), XDG_STATE_HOME=str(home / "state"))  # loopback: see conftest
    c = RayCluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}})
    workers = [c.add_node(**NODE) for _ in range(3)]
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    (home / "nap.py").write_text(NAP)
    try:
        yield c, workers, home
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _policy(home, **tenants) -> Policy:
    return Policy(tenants={name: Tenant(**quota) for name, quota in tenants.items()},
                  settings=Settings(state_dir=str(home / "state")), cluster=Cluster(lease_ttl=TTL))


def _nap(home, seconds: float, tenant: str | None, **limits) -> JobSpec:
    return JobSpec(kernel=str(home / "nap.py"), argv=[str(seconds)], tenant=tenant,
                   limits=Limits(memory="256MiB", **limits))


def _usage() -> dict:
    return ray.get(sray.authority().usage.remote(), timeout=30)


def _wait(predicate, timeout: float = 60, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.1)
    return value


def _running(tenant: str) -> int:
    return _usage()["tenants"].get(tenant, {}).get("running", 0)


def _attached(node_id: str) -> int:
    return _usage()["nodes"].get(node_id, {}).get("leases", 0)


def _most_at_once(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def _pinned(node) -> dict:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=False)}


OTHER_DRIVER = """
import json, sys
import ray
from sandbox import JobSpec, Policy
from sandbox import ray as sray
ray.init(address=sys.argv[1], log_to_driver=False)
policy = Policy.model_validate_json(sys.argv[2])
spec = JobSpec.model_validate_json(sys.argv[3])
with sray.RayExecutor(policy=policy) as ex:
    futures = [ex.submit(spec.model_copy(update={"job_id": f"{spec.job_id}-{i}"}), quiet=True) for i in range(3)]
    print(json.dumps([json.loads(f.result(timeout=300).model_dump_json()) for f in futures]))
"""


def test_a_tenant_cap_holds_across_nodes_drivers_and_entry_points(cluster):
    c, _, home = cluster
    policy = _policy(home, a={"max_concurrent": 2})
    other = subprocess.Popen([sys.executable, "-c", OTHER_DRIVER, c.address, policy.model_dump_json(),
                              _nap(home, 1.5, "a").model_dump_json()], stdout=subprocess.PIPE, text=True)
    refs = [sray.submit(_nap(home, 1.5, "a"), policy, quiet=True, scheduling_strategy="SPREAD") for _ in range(3)]
    with sray.RayExecutor(policy=policy) as ex:
        futures = [ex.submit(_nap(home, 1.5, "a"), quiet=True) for _ in range(3)]
        results = [f.result(timeout=300) for f in futures]
    results += [sray.result(ref, timeout=300) for ref in refs]
    theirs = json.loads(other.communicate(timeout=300)[0])
    assert all(r.verdict is Verdict.ok for r in results) and all(r["verdict"] == "ok" for r in theirs), \
        [r.reason for r in results] + [r["reason"] for r in theirs]
    spans = [(r.started_at, r.ended_at) for r in results] + [(r["started_at"], r["ended_at"]) for r in theirs]
    assert _most_at_once(spans) == 2, sorted(spans)
    assert len({r.labels["ray_node_id"] for r in results}) >= 2, "every job ran on one node"
    assert _running("a") == 0
    calls = _usage().get("calls", {})
    assert calls.get("acquire", 0) <= 10, calls  # one per job, 9 (the old ledger: 468 for 12 jobs)


def test_a_node_removed_mid_job_gives_crashed_verdicts_and_frees_the_share_within_seconds(cluster):
    c, _, home = cluster
    policy = _policy(home, b={"max_concurrent": 2})
    victim = c.add_node(**NODE)
    c.wait_for_nodes()
    refs = [sray.submit(_nap(home, 120, "b"), policy, quiet=True, **_pinned(victim)) for _ in range(2)]
    _wait(lambda: _attached(victim.node_id) == 2, what="both jobs attached to the node")
    time.sleep(1)  # running, not just attached
    removed = time.monotonic()
    c.remove_node(victim)
    results = [sray.result(ref, timeout=120) for ref in refs]
    assert [r.verdict for r in results] == [Verdict.crashed] * 2, [r.reason for r in results]
    assert all("node" in r.reason or "worker" in r.reason for r in results), [r.reason for r in results]
    _wait(lambda: _running("b") == 0, timeout=30, what="the tenant's share freed")
    assert time.monotonic() - removed < 30
    assert sray.result(sray.submit(_nap(home, 0.1, "b"), policy, quiet=True), timeout=120).verdict is Verdict.ok


def test_the_authority_killed_mid_run_loses_no_lease_and_overbooks_nothing(cluster):
    _, _, home = cluster
    policy = _policy(home, c={"max_concurrent": 2})
    first = [sray.submit(_nap(home, 4, "c"), policy, quiet=True) for _ in range(2)]
    _wait(lambda: _running("c") == 2, what="two leases held")
    epoch = _usage().get("epoch", 0)
    ray.kill(sray.authority(), no_restart=False)  # Ray restarts it; its state comes back from the GCS
    late = sray.submit(_nap(home, 0.5, "c"), policy, quiet=True)
    # ray.kill returns before the actor is gone: wait for an answer of its next incarnation
    usage = _wait(lambda: (u := _usage())["epoch"] > epoch and u, what="the restarted authority answers")
    assert usage["tenants"]["c"]["running"] == 2, usage
    results = [sray.result(ref, timeout=120) for ref in [*first, late]]
    assert all(r.verdict is Verdict.ok for r in results), [r.reason for r in results]
    assert _most_at_once([(r.started_at, r.ended_at) for r in results]) == 2
    assert results[2].started_at >= min(r.ended_at for r in results[:2]) - 0.05


def test_an_authority_killed_for_good_gives_rejected_verdicts_then_comes_back_from_the_gcs(cluster):
    _, _, home = cluster
    policy = _policy(home, e={"max_concurrent": 1}, f={})
    with sray.RayExecutor(policy=policy) as ex:
        running = ex.submit(_nap(home, 12, "e"), quiet=True)
        _wait(lambda: _running("e") == 1, what="a lease held")
        ray.kill(sray.authority(), no_restart=True)
        refused = ex.submit(_nap(home, 0.1, "e"), quiet=True).result(timeout=60)
        assert refused.verdict is Verdict.rejected and "quota authority" in refused.reason, refused.reason
        other = ex.submit(_nap(home, 0.1, "f"), quiet=True).result(timeout=120)  # a new authority, from the GCS
        assert other.verdict is Verdict.ok, other.reason
        assert _running("e") == 1, "the restored authority lost the running job's lease"
        after = ex.submit(_nap(home, 0.1, "e"), quiet=True).result(timeout=120)
        first = running.result(timeout=120)
    assert first.verdict is Verdict.ok and after.verdict is Verdict.ok, (first.reason, after.reason)
    assert after.started_at >= first.ended_at - 0.05, "the tenant's cap of 1 was overbooked"


def _job_processes() -> set[int]:
    found = set()
    for proc in psutil.process_iter():
        try:
            if proc.cmdline()[:1] == [sys.executable] and any("sandbox.job.forkserver" in a for a in proc.cmdline()):
                found |= {p.pid for p in proc.children(recursive=True)}
        except psutil.Error:
            continue
    return found


def _ray_processes_of(node) -> list[psutil.Process]:
    """The node's raylet and its Ray workers: not the fork-servers the workers started (they left the
    worker's tree) nor their jobs."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    jobs = _job_processes()
    return [raylet] + [p for p in raylet.children(recursive=True) if p.pid not in jobs
                       and not any("sandbox.job.forkserver" in a for a in p.cmdline())]


def test_a_frozen_node_loses_its_lease_and_ends_its_job(cluster):
    c, _, home = cluster
    policy = _policy(home, d={"max_concurrent": 1})
    node = c.add_node(**NODE)
    c.wait_for_nodes()
    before = _job_processes()
    ref = sray.submit(_nap(home, 120, "d", wall_time="300s"), policy, quiet=True, **_pinned(node))
    _wait(lambda: _attached(node.node_id) == 1, what="the job attached")
    pids = _wait(lambda: _job_processes() - before, what="the job's processes")
    frozen = _ray_processes_of(node)
    for proc in frozen:
        proc.send_signal(signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        _wait(lambda: _running("d") == 0, timeout=TTL * 3, what="the authority freed the frozen node's lease")
        # never before the node has ended the job (its fork-server, the supervisor being frozen)
        assert not any(alive(p) for p in pids), "the share was freed while the frozen node's job still ran"
        assert time.monotonic() - stopped < TTL * 3
    finally:
        for proc in frozen:
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.Error:
                pass
    r = sray.result(ref, timeout=120)
    assert r.verdict is Verdict.crashed, r.reason
    assert "lease" in r.reason or "node" in r.reason or "worker" in r.reason, r.reason
    c.remove_node(node)


def test_unlimited_memory_reserves_a_node_not_the_cluster(cluster):
    c, workers, home = cluster
    policy = _policy(home)
    unlimited = [JobSpec(kernel=str(home / "nap.py"), argv=["2"]) for _ in range(2)]
    refs = [sray.submit(spec, policy, quiet=True, **_pinned(node)) for spec, node in zip(unlimited, workers)]
    results = [sray.result(ref, timeout=120) for ref in refs]
    assert all(r.verdict is Verdict.ok for r in results), [r.reason for r in results]
    assert _most_at_once([(r.started_at, r.ended_at) for r in results]) == 2, "two nodes ran one at a time"
    # on one node, an unlimited job and a limited one take turns: the first reserves the whole node
    refs = [sray.submit(spec, policy, quiet=True, **_pinned(workers[0]))
            for spec in (JobSpec(kernel=str(home / "nap.py"), argv=["2"]), _nap(home, 0.5, None))]
    results = [sray.result(ref, timeout=120) for ref in refs]
    assert all(r.verdict is Verdict.ok for r in results), [r.reason for r in results]
    assert _most_at_once([(r.started_at, r.ended_at) for r in results]) == 1
