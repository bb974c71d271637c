"""Sandboxed jobs inside real Ray tasks on a local cluster bound to 127.0.0.1."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

ray = pytest.importorskip("ray")

from sandbox import JobResult, JobSpec, Limits, Policy, Verdict  # noqa: E402
from sandbox import ray as sray  # noqa: E402
from sandbox.node.executor import Capacity  # noqa: E402
from sandbox.core.limits import Cluster, GiB, Settings, Tenant, load_policy  # noqa: E402

from .conftest import alive, kernel  # noqa: E402


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, ray_home):
    home = tmp_path_factory.mktemp("ray")
    saved = {k: os.environ.get(k) for k in ("HOME", "XDG_STATE_HOME")}
    os.environ.update(HOME=str(ray_home), XDG_STATE_HOME=str(home / "state"))  # loopback: see conftest
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # a default memory limit: an unlimited job reserves the whole node, and would wait here for the
        # lease of every job a test killed to lapse (never freed while its job may run)
        yield Policy(settings=Settings(state_dir=str(home / "state")), cluster=Cluster(lease_ttl=10),
                     defaults=Limits(memory="512MiB"))
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_cluster_is_bound_to_loopback_only(cluster):
    assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
    listening = set()
    for proc in psutil.process_iter():
        try:
            listening |= {c.laddr.ip for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    assert listening and all(ip in ("127.0.0.1", "::ffff:127.0.0.1", "::1") for ip in listening), listening


def test_ok_and_limit_verdicts_come_back_with_ray_labels(cluster):
    refs = {
        "ok": sray.submit(JobSpec(kernel=kernel("reduction.py:sum_of_squares"), kwargs={"n": 100}), cluster),
        "cpu_time": sray.submit(JobSpec(kernel=kernel("cpu_hog.py"), limits=Limits(cpu_time="1s")), cluster),
        "memory": sray.submit(JobSpec(kernel=kernel("memory_hog.py"), limits=Limits(memory="300MiB")), cluster),
        "wall_time": sray.submit(JobSpec(kernel=kernel("sleeper.py"), limits=Limits(wall_time="1s")), cluster),
        "error": sray.submit(JobSpec(kernel=kernel("exception.py")), cluster),
        "crashed": sray.submit(JobSpec(kernel=kernel("segfault.py")), cluster),
        "output": sray.submit(JobSpec(kernel=kernel("output_flood.py"), limits=Limits(max_output="1MiB")), cluster),
        "processes": sray.submit(JobSpec(kernel=kernel("spawner.py"), limits=Limits(max_processes=3)), cluster),
    }
    results = {name: sray.result(ref, timeout=120) for name, ref in refs.items()}
    assert {name: r.verdict.value for name, r in results.items()} == {name: name for name in refs}
    assert results["ok"].return_value == 328350
    labels = results["ok"].labels
    assert labels["ray_node_id"] == ray.nodes()[0]["NodeID"] and labels["ray_task_id"]
    assert "CPU=1" in labels["ray_resources"]


def test_callable_with_array_result_through_ray(cluster):
    weights = np.array([1.0, np.nan], np.float32)
    r = sray.result(sray.submit(JobSpec(kernel=lambda k: {"w": weights * k}, args=[2]), cluster), timeout=120)
    assert r.verdict is Verdict.ok, r.reason
    w = r.return_value["w"]
    assert w.dtype == np.float32 and w[0] == 2.0 and np.isnan(w[1])
    r = sray.result(sray.submit(functools.partial(np.arange, 3, dtype=np.int16), cluster), timeout=120)
    assert r.ok and r.return_value.dtype == np.int16 and r.return_value.tolist() == [0, 1, 2]


def test_resource_mapping():
    spec = JobSpec(kernel="k.py", arch="cuda")
    assert sray.resource_options(spec, Limits(gpu_memory="25%", memory="2GiB", cpu_threads=4)) == {
        "num_cpus": 4, "max_retries": 0, "memory": 2 * GiB, "num_gpus": 0.25}
    assert sray.resource_options(spec, Limits(gpu_memory="10GiB"), device_memory=40 * GiB)["num_gpus"] == 0.25
    assert sray.resource_options(spec, Limits())["num_gpus"] == 1
    assert "num_gpus" not in sray.resource_options(JobSpec(kernel="k.py"), Limits(gpu_memory="1GiB"))


def test_gpu_resource_reaches_the_child_as_cuda_visible_devices(cluster, tmp_path):
    script = tmp_path / "cvd.py"
    script.write_text("import os\nprint(os.environ.get('CUDA_VISIBLE_DEVICES'))\n")
    r = sray.result(sray.submit(JobSpec(kernel=str(script)), cluster, num_gpus=1), timeout=60)
    assert r.verdict is Verdict.ok and r.stdout_tail.strip() in ("0", "1")
    assert "GPU=1" in r.labels["ray_resources"]


def test_twenty_jobs_in_parallel_nothing_lost(cluster):
    specs = [JobSpec(kernel=kernel("tiny.py")) for _ in range(20)]
    refs = [sray.submit(s, cluster) for s in specs]
    results = [sray.result(ref, timeout=300) for ref in refs]
    assert sorted(r.job_id for r in results) == sorted(s.job_id for s in specs)
    assert all(r.verdict is Verdict.ok for r in results)


def _wait_for_job_processes(minimum: int, before: set[int], timeout: float = 60) -> list[int]:
    """At least `minimum` job processes that were not there `before` (what earlier tests' fork-servers
    still hold is not this job's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [p for p in _running_job_pids() if p not in before]
        if len(pids) >= minimum:
            return pids
        time.sleep(0.2)
    raise AssertionError(f"job processes did not appear (already there: {sorted(before)})")


def _running_job_pids() -> list[int]:
    """Every live descendant of any fork-server of this checkout's interpreter (the jobs of every
    worker; not those of a test run in another checkout)."""
    found = []
    for proc in psutil.process_iter():
        try:
            cmdline = proc.cmdline()
            if proc.status() != psutil.STATUS_ZOMBIE and cmdline[:1] == [sys.executable] and \
                    any("sandbox.job.forkserver" in a for a in cmdline):
                found += [c.pid for c in proc.children(recursive=True) if c.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            continue
    return found


def _gone(pids: list[int], within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _audit_types(policy: Policy, job_id: str, expected: int = 0) -> list[str]:
    """The job's audit record types, once at least `expected` are there (or after 30 s)."""
    audit = policy.settings.resolved_audit_log()
    deadline = time.monotonic() + 30
    while True:
        types = [r["type"] for r in map(json.loads, audit.read_text().splitlines()) if r.get("job_id") == job_id]
        if len(types) >= expected or time.monotonic() > deadline:
            return types
        time.sleep(0.1)


@pytest.mark.parametrize("force", [False, True])
def test_cancel_leaves_no_job_process_and_a_verdict(cluster, force):
    # a memory limit: a killed worker's lease lapses (~13 s here) holding this, not the whole node
    spec = JobSpec(kernel=kernel("spawner.py"), limits=Limits(wall_time="120s", grace="1s", memory="512MiB"))
    before = set(_running_job_pids())
    ref = sray.submit(spec, cluster)
    pids = _wait_for_job_processes(10, before)
    t = time.monotonic()
    r = sray.cancel(ref, force)
    assert time.monotonic() - t < 10
    assert _gone(pids)
    if force:  # the worker is killed: its fork-server, which outlives it, records how the job ended
        assert r.verdict in (Verdict.cancelled, Verdict.crashed), r.reason
        assert _audit_types(cluster, spec.job_id, 2) == ["started", "aborted"]
    else:  # the task ends the job gracefully and records its verdict itself (Ray answers before)
        assert r.verdict is Verdict.cancelled, r.reason
        assert _audit_types(cluster, spec.job_id, 2) == ["started", "job"]


def test_worker_killed_mid_job_leaves_no_orphan_and_a_verdict(cluster):
    spec = JobSpec(kernel=kernel("spawner.py"), limits=Limits(wall_time="120s", memory="512MiB"))
    before = set(_running_job_pids())
    ref = sray.submit(spec, cluster)
    pids = _wait_for_job_processes(10, before)
    # Ray titles a busy worker "ray::<task name>"; the task is named after the job.
    (worker,) = [p for p in psutil.process_iter(["cmdline"])
                 if f"taichi-sandbox:{spec.job_id}" in " ".join(p.info["cmdline"] or [])]
    worker.kill()
    assert _gone(pids)
    r = sray.result(ref, timeout=30)
    assert r.verdict is Verdict.crashed and "worker" in r.reason, r.reason
    assert _audit_types(cluster, spec.job_id, 2) == ["started", "aborted"]


def test_ray_executor_same_surface(cluster, tmp_path):
    with sray.RayExecutor(max_concurrent=2, capacity=Capacity(2, 8 * GiB, None), policy=cluster) as ex:
        results = list(ex.map([JobSpec(kernel=kernel("tiny.py"), limits=Limits(memory="1GiB")) for _ in range(4)]))
        before = set(_running_job_pids())
        running = ex.submit(JobSpec(kernel=kernel("sleeper.py"), limits=Limits(memory="1GiB", wall_time="60s")))
        _wait_for_job_processes(1, before)
        running.cancel()
        cancelled = running.result(timeout=30)
    assert [r.verdict for r in results] == [Verdict.ok] * 4
    assert cancelled.verdict is Verdict.cancelled
    assert all(r.labels.get("ray_task_id") for r in results)


def test_audit_records_carry_ray_labels(cluster):
    r = sray.result(sray.submit(JobSpec(kernel=kernel("tiny.py"), limits=Limits(memory="512MiB")), cluster),
                    timeout=60)
    audit = cluster.settings.resolved_audit_log()
    record = next(json.loads(line) for line in audit.read_text().splitlines()
                  if json.loads(line).get("job_id") == r.job_id and json.loads(line)["type"] == "job")
    assert record["labels"]["ray_task_id"] == r.labels["ray_task_id"]
    assert re.fullmatch(r"[0-9a-f]+", record["labels"]["ray_node_id"])


def test_tenant_quota_is_shared_by_executors_through_the_authority(cluster, tmp_path):
    from sandbox.core.limits import Tenant
    policy = Policy(tenants={"a": Tenant(max_concurrent=1)}, settings=cluster.settings, cluster=cluster.cluster)
    nap = tmp_path / "nap.py"
    nap.write_text("import time\ntime.sleep(0.5)\n")
    spec = lambda: JobSpec(kernel=str(nap), tenant="a", limits=Limits(memory="1GiB"))  # noqa: E731
    with sray.RayExecutor(max_concurrent=2, capacity=Capacity(2, 8 * GiB, None), policy=policy) as one, \
            sray.RayExecutor(max_concurrent=2, capacity=Capacity(2, 8 * GiB, None), policy=policy) as two:
        futures = [ex.submit(spec()) for ex in (one, two, one, two)]
        results = [f.result(timeout=120) for f in futures]
    assert all(r.verdict is Verdict.ok for r in results)
    spans = sorted((r.started_at, r.ended_at) for r in results)
    assert all(later[0] >= earlier[1] - 0.05 for earlier, later in zip(spans, spans[1:])), spans
    assert ray.get(sray.authority().usage.remote())["tenants"].get("a", {}).get("running", 0) == 0


@pytest.mark.slow
def test_a_dead_driver_s_lease_lapses(cluster):
    """A lease granted to a driver that died before any task attached it is freed after the ttl."""
    code = ("import ray; ray.init(address='auto', log_to_driver=False); from sandbox import ray as s; "
            "assert 'granted' in ray.get(s.authority(10).acquire.remote('ghost', 'b', 'ghost-holder', 0, 0, "
            "{'max_concurrent': 1})); import os; os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True)
    auth = sray.authority()
    assert ray.get(auth.usage.remote())["tenants"]["b"]["running"] == 1
    deadline = time.monotonic() + 30
    while ray.get(auth.usage.remote())["tenants"].get("b", {}).get("running") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not ray.get(auth.usage.remote())["tenants"].get("b", {}).get("running")
    assert "granted" in ray.get(auth.acquire.remote("next", "b", "h", 0, 0, {"max_concurrent": 1}))
    ray.get(auth.release.remote(["next"]))


RAY_SNOOP = """
import json, os, socket, sys
cmdlines = []
for pid in os.listdir("/proc"):
    try:
        cmdlines.append(open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\\0", b" ").decode())
    except (OSError, ValueError):
        continue
host, port = sys.argv[1], int(sys.argv[2])
try:
    socket.create_connection((host, port), timeout=2).close()
    gcs = "connected"
except OSError as err:
    gcs = type(err).__name__
print(json.dumps({"raylet": any("raylet" in c or "gcs_server" in c for c in cmdlines), "gcs": gcs}))
"""


def test_a_job_in_a_ray_task_can_neither_see_the_raylet_nor_reach_the_gcs(cluster, tmp_path):
    from sandbox.job.namespaces import probe
    if probe() is not None:
        pytest.skip(f"no namespaces here: {probe()}")
    host, port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
    script = tmp_path / "snoop.py"
    script.write_text(RAY_SNOOP)
    shared = cluster.model_copy(update={"settings": cluster.settings.model_copy(update={"isolation": "off",
                                                                                        "allow_root": True})})
    results = [sray.result(sray.submit(JobSpec(kernel=str(script), argv=[host, port]), policy), timeout=120)
               for policy in (shared, cluster)]
    assert all(r.verdict is Verdict.ok for r in results), [(r.reason, r.stderr_tail) for r in results]
    # Without namespaces the job sees the raylet (its command line names the GCS address) and connects.
    assert [json.loads(r.stdout_tail) for r in results] == [{"raylet": True, "gcs": "connected"},
                                                            {"raylet": False, "gcs": "ConnectionRefusedError"}]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the node service's clients as other uids")
def test_ray_tasks_and_local_clients_share_one_node_service(cluster, tmp_path):
    """A Ray task on a node with a running service submits through it: the node's quotas hold across
    a local client and the task, the task's files travel as its own, and a cancelled task cancels
    its job there."""
    from .test_service import ALICE, SLEEP, Node, as_uid, client_dir
    node = Node(tmp_path / "node")
    try:
        home = client_dir(tmp_path, ALICE, **{"sleep.py": SLEEP})
        local = subprocess.Popen(as_uid(ALICE, "-m", "sandbox", "run", "sleep.py", "--json", "--socket",
                                        str(node.socket), "--", "3"), cwd=home, stdout=subprocess.PIPE, text=True)
        _wait_for_service_job(node, ALICE)
        (tmp_path / "data.txt").write_text("7")
        job = tmp_path / "copy.py"
        job.write_text("import os\nopen('out.txt', 'w').write(open('data.txt').read())\nprint(os.getuid())\n")
        spec = JobSpec(kernel=str(job), tenant="alice", inputs=[str(tmp_path / "data.txt")],
                       output_dir=str(tmp_path / "out"), outputs=["*.txt"])
        policy = load_policy(str(node.limits))  # the node's: the driver sizes Ray resources by it
        r = sray.result(sray.submit(spec, policy, service=str(node.socket)), timeout=120)
        theirs = json.loads(local.communicate(timeout=60)[0])
        assert r.verdict is Verdict.ok and theirs["verdict"] == "ok", (r.reason, r.traceback)
        assert r.started_at >= theirs["ended_at"], "alice's max_concurrent = 1 did not hold for the Ray task"
        assert (tmp_path / "out" / "out.txt").read_text() == "7" and r.outputs == [str(tmp_path / "out" / "out.txt")]
        (record,) = [rec for rec in node.records("job") if rec["job_id"] == r.job_id]
        assert record["tenant"] == "alice" and record["uid"] == 0 and record["labels"]["ray_task_id"]
        (tmp_path / "sleep.py").write_text(SLEEP)
        for force in (False, True):  # a forced cancel kills the worker: its connection's end cancels the job
            ref = sray.submit(JobSpec(kernel=str(tmp_path / "sleep.py"), argv=["60"]), policy,
                              service=str(node.socket))
            running = _wait_for_service_job(node, 0)
            assert sray.cancel(ref, force).verdict in ((Verdict.cancelled, Verdict.crashed) if force else
                                                      (Verdict.cancelled,))
            deadline = time.monotonic() + 30
            while not (ended := [rec for rec in node.records("job") if rec["job_id"] == running["job_id"]]):
                assert time.monotonic() < deadline, f"the service's job outlived its cancelled task ({force=})"
                time.sleep(0.1)
            assert ended[0]["verdict"] == "cancelled" and ended[0]["usage"]["wall_seconds"] < 30
    finally:
        assert node.stop() == 0


@pytest.mark.slow  # ~25 s: the lease's end, the job's grace, then the thawed task's answer
def test_a_frozen_worker_cannot_keep_its_service_job_past_its_lease(cluster, tmp_path):
    """Through the node service the Ray worker forwards each renewal of the job's lease; frozen, it
    renews nothing, and the service ends the job at the lease's end (verdict `crashed`), long
    before its wall_time: the share the authority frees is not overbooked."""
    from .test_service import SLEEP, Node
    node = Node(tmp_path / "node")
    worker = None
    try:
        (tmp_path / "sleep.py").write_text(SLEEP)
        policy = load_policy(str(node.limits)).model_copy(update={"cluster": Cluster(lease_ttl=10)})
        spec = JobSpec(kernel=str(tmp_path / "sleep.py"), argv=["60"], limits=Limits(wall_time="120s"))
        ref = sray.submit(spec, policy, service=str(node.socket))
        running = _wait_for_service_job(node, 0)
        (worker,) = [p for p in psutil.process_iter(["cmdline"])
                     if f"taichi-sandbox:{spec.job_id}" in " ".join(p.info["cmdline"] or [])]
        worker.suspend()
        deadline = time.monotonic() + 40
        while not (ended := [rec for rec in node.records("job") if rec["job_id"] == running["job_id"]]):
            assert time.monotonic() < deadline, "the service's job outlived the lease of its frozen worker"
            time.sleep(0.2)
        assert ended[0]["verdict"] == "crashed" and "its cluster lease lapsed" in ended[0]["reason"], ended[0]
        assert ended[0]["usage"]["wall_seconds"] < 30
        worker.resume()
        worker = None
        r = sray.result(ref, timeout=60)
        assert r.verdict is Verdict.crashed and "lease" in r.reason, r.reason
    finally:
        if worker is not None:
            worker.resume()
        assert node.stop() == 0


def _wait_for_service_job(node, uid: int) -> dict:
    deadline = time.monotonic() + 60
    while not (jobs := [j for j in node.ask({"op": "ps"})[0]["jobs"] if j["uid"] == uid and j["state"] == "running"]):
        assert time.monotonic() < deadline, f"no job of uid {uid} ever ran"
        time.sleep(0.1)
    return jobs[0]


def test_a_task_started_without_submit_runs_nothing(cluster, tmp_path):
    """`run_in_task` as a Ray task of one's own (no lease) is a way around the tenant quotas: refused."""
    script = tmp_path / "ran.py"
    script.write_text("print('ran')\n")
    spec = JobSpec(kernel=str(script), tenant="a")
    policy = Policy(tenants={"a": {"max_concurrent": 1}}, settings=cluster.settings, cluster=cluster.cluster)
    answer = ray.get(ray.remote(sray.run_in_task).remote(spec.model_dump_json(), policy.model_dump_json(), None, True))
    r = JobResult.model_validate_json(answer)
    assert r.verdict is Verdict.rejected and "no lease" in r.reason and "ran" not in r.stdout_tail, r


def test_every_ray_failure_maps_to_a_verdict_with_its_cause():
    from sandbox.ray.outcome import failure_verdict
    ex = ray.exceptions
    cases = {ex.TaskCancelledError(): ("cancelled", "cancelled"), ex.ActorDiedError(): ("rejected", "quota authority"),
             ex.NodeDiedError("node 1 is dead"): ("crashed", "node running the job died"),
             ex.OutOfMemoryError("worker killed: memory used 95%"): ("crashed", "memory monitor"),
             ex.WorkerCrashedError(): ("crashed", "worker"), ex.ObjectLostError("0" * 56, "", ""): ("crashed", "lost"),
             RuntimeError("\x1b[36mboom\x1b[39m"): ("crashed", "RuntimeError: boom")}
    for err, (verdict, words) in cases.items():
        got, reason = failure_verdict(err)
        assert got.value == verdict and words in reason and "\x1b" not in reason, (err, got, reason)


def test_ray_executor_threads_do_not_grow_with_the_jobs_in_flight(cluster, tmp_path):
    import threading
    nap = tmp_path / "nap.py"
    nap.write_text("import time\ntime.sleep(1)\n")
    before = threading.active_count()
    with sray.RayExecutor(policy=cluster) as ex:
        futures = [ex.submit(JobSpec(kernel=str(nap), limits=Limits(memory="256MiB")), quiet=True) for _ in range(12)]
        time.sleep(1)
        during = threading.active_count()
        results = [f.result(timeout=120) for f in futures]
    assert all(r.verdict is Verdict.ok for r in results), [r.reason for r in results]
    assert during - before <= 6, (before, during)  # picker, finisher, alerts, keeper: not one per job


def test_cancelling_many_ray_jobs_takes_one_thread(cluster):
    import threading
    with sray.RayExecutor(policy=cluster) as ex:
        futures = [ex.submit(JobSpec(kernel=kernel("sleeper.py"), limits=Limits(memory="256MiB", wall_time="60s")),
                             quiet=True) for _ in range(8)]
        time.sleep(1)
        before = threading.active_count()
        for future in futures + futures:  # a job cancelled twice is cancelled once
            future.cancel()
        during = threading.active_count()
        results = [f.result(timeout=60) for f in futures]
    assert all(r.verdict is Verdict.cancelled for r in results), [r.reason for r in results]
    assert during - before <= 1, (before, during)


def test_cluster_command_shows_the_authority_s_tenants_and_nodes(cluster, tmp_path):
    r = sray.result(sray.submit(JobSpec(kernel=kernel("tiny.py"), tenant=None, limits=Limits(memory="512MiB")),
                                cluster, quiet=True), timeout=120)
    assert r.ok, r.reason
    address = ray.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-m", "sandbox", "cluster", "--address", address, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    usage = json.loads(out.stdout)
    assert "_default" in usage["tenants"] and usage["nodes"] and usage["calls"]["acquire"] >= 1
    table = subprocess.run([sys.executable, "-m", "sandbox", "cluster", "--address", address],
                           capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert table.returncode == 0 and "_default" in table.stdout and "memory reserved" in table.stdout, table


def test_an_error_the_authority_raises_is_rejected_not_crashed(cluster):
    """Its calls' errors reach the job's task as its argument's: admission could not be decided."""
    from sandbox.ray.outcome import failure_verdict
    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(sray.authority(cluster.cluster.lease_ttl).acquire.remote("only-an-id"), timeout=60)
    verdict, reason = failure_verdict(caught.value)
    assert verdict is Verdict.rejected and "quota authority failed" in reason, reason


def test_one_jobspec_submitted_twice_is_two_jobs_to_the_tenant_quota(cluster, tmp_path):
    """Each submission has its own lease: the same JobSpec object twice does not share one grant."""
    script = tmp_path / "nap.py"
    script.write_text("import time\ntime.sleep(1.5)\n")
    policy = cluster.model_copy(update={"tenants": {"solo": Tenant(max_concurrent=1)}})
    spec = JobSpec(kernel=str(script), tenant="solo", limits=Limits(memory="256MiB"))
    results = [sray.result(ref, timeout=120) for ref in [sray.submit(spec, policy, quiet=True) for _ in range(2)]]
    assert [r.verdict for r in results] == [Verdict.ok] * 2, [r.reason for r in results]
    first, second = sorted((r.started_at, r.ended_at) for r in results)
    assert second[0] >= first[1] - 0.05, "max_concurrent = 1 did not hold for one spec submitted twice"


def test_a_task_that_cannot_be_started_is_rejected_and_holds_no_lease(cluster):
    policy = cluster.model_copy(update={"tenants": {"opts": Tenant(max_concurrent=1)}})
    with sray.RayExecutor(policy=policy, ray_options={"num_cpus": "lots"}) as ex:
        r = ex.submit(JobSpec(kernel=kernel("tiny.py"), tenant="opts"), quiet=True).result(timeout=60)
    assert r.verdict is Verdict.rejected and "could not be started" in r.reason, r.reason
    deadline = time.monotonic() + 15
    while (held := ray.get(sray.authority().usage.remote())["tenants"].get("opts", {}).get("running", 0)):
        assert time.monotonic() < deadline, f"{held} lease(s) of a job that never started still held"
        time.sleep(0.2)
