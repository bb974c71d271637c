"""The executor with real jobs: capacity, tenant quotas, rate limits, priorities, alerts, metrics."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from concurrent.futures import CancelledError

import pytest

from sandbox import JobSpec, Limits, Policy, Verdict
from sandbox.node.alerts import Alerts
from sandbox.core.audit import AuditLog
from sandbox.node.executor import RESERVE_AFTER, Capacity, QueueFull, SandboxExecutor
from sandbox.node.future import JobFuture
from sandbox.watch.gpu import probe
from sandbox.core.limits import GiB, Alerts as AlertSettings, JobType, Settings, Tenant

from .conftest import assert_no_survivors, kernel

SLEEP = "import time\ntime.sleep({s})\n"


def _script(tmp_path, seconds: float, name: str = "nap.py") -> str:
    path = tmp_path / name
    path.write_text(SLEEP.format(s=seconds))
    return str(path)


def _policy(tmp_path, **tables) -> Policy:
    return Policy(settings=Settings(state_dir=str(tmp_path / "state")), **tables)


def _overlaps(results) -> int:
    """The most jobs that ran at the same time, from their own start/end times."""
    events = sorted([(r.started_at, 1) for r in results] + [(r.ended_at, -1) for r in results])
    most = now = 0
    for _, delta in events:
        now += delta
        most = max(most, now)
    return most


def test_node_memory_capacity_is_never_oversubscribed(tmp_path):
    with SandboxExecutor(max_concurrent=4, capacity=Capacity(4, 3 * GiB, None), policy=_policy(tmp_path)) as ex:
        specs = [JobSpec(kernel=_script(tmp_path, 0.4), limits=Limits(memory="1GiB")) for _ in range(8)]
        results = list(ex.map(specs))
    assert all(r.verdict is Verdict.ok for r in results)
    assert _overlaps(results) == 3


def test_job_bigger_than_node_is_rejected_at_once_with_the_excess(tmp_path):
    with SandboxExecutor(capacity=Capacity(2, 4 * GiB, 8 * GiB), policy=_policy(tmp_path)) as ex:
        r = ex.submit(JobSpec(kernel=kernel("tiny.py"), limits=Limits(memory="6GiB"))).result(timeout=1)
        g = ex.submit(JobSpec(kernel=kernel("tiny.py"), arch="vulkan", limits=Limits(memory="1GiB",
                                                                                       gpu_memory="9GiB"))).result(1)
        c = ex.submit(JobSpec(kernel=kernel("tiny.py"), limits=Limits(memory="1GiB", cpu_threads=3))).result(1)
    assert r.verdict is Verdict.rejected and r.reason == "memory 6.00 GiB exceeds node capacity 4.00 GiB by 2.00 GiB"
    assert g.verdict is Verdict.rejected and "exceeds node capacity 8.00 GiB by 1.00 GiB" in g.reason
    assert c.verdict is Verdict.rejected and "3 CPU slots" in c.reason


def test_tenant_concurrency_quota_makes_jobs_wait(tmp_path):
    policy = _policy(tmp_path, tenants={"a": Tenant(max_concurrent=1), "b": Tenant()})
    with SandboxExecutor(max_concurrent=3, capacity=Capacity(3, 8 * GiB, None), policy=policy) as ex:
        fa = [ex.submit(JobSpec(kernel=_script(tmp_path, 0.3), tenant="a", limits=Limits(memory="1GiB")))
              for _ in range(3)]
        fb = [ex.submit(JobSpec(kernel=_script(tmp_path, 0.3), tenant="b", limits=Limits(memory="1GiB")))
              for _ in range(3)]
        a, b = [f.result() for f in fa], [f.result() for f in fb]
    assert _overlaps(a) == 1 and _overlaps(b) >= 2


def test_tenant_memory_quota_rejects_or_waits(tmp_path):
    policy = _policy(tmp_path, tenants={"a": Tenant(memory_quota="2GiB")})
    with SandboxExecutor(max_concurrent=3, capacity=Capacity(3, 8 * GiB, None), policy=policy) as ex:
        too_big = ex.submit(JobSpec(kernel=kernel("tiny.py"), tenant="a", limits=Limits(memory="3GiB"))).result()
        results = list(ex.map([JobSpec(kernel=_script(tmp_path, 0.3), tenant="a", limits=Limits(memory="1GiB"))
                               for _ in range(4)]))
    assert too_big.verdict is Verdict.rejected
    assert too_big.reason == "tenant a memory quota 2.00 GiB exceeded by 1.00 GiB"
    assert _overlaps(results) == 2


@pytest.mark.skipif(not probe("vulkan").usable, reason="no Vulkan driver here")
def test_tenant_gpu_memory_quota_with_real_vulkan_jobs(tmp_path):
    policy = _policy(tmp_path, tenants={"a": Tenant(gpu_memory_quota="2GiB")})
    with SandboxExecutor(max_concurrent=3, capacity=Capacity(3, 8 * GiB, 8 * GiB), policy=policy) as ex:
        over = ex.submit(JobSpec(kernel=kernel("tiny.py"), arch="vulkan", tenant="a",
                                 limits=Limits(memory="1GiB", gpu_memory="3GiB"))).result()
        results = list(ex.map([JobSpec(kernel=kernel("tiny.py"), arch="vulkan", tenant="a",
                                       limits=Limits(memory="1GiB", gpu_memory="1GiB")) for _ in range(4)]))
    assert over.verdict is Verdict.rejected and "gpu_memory quota 2.00 GiB exceeded by 1.00 GiB" in over.reason
    assert all(r.verdict is Verdict.ok and r.arch == "vulkan" for r in results)
    assert _overlaps(results) <= 2


def test_rate_limit_token_bucket(tmp_path):
    policy = _policy(tmp_path, tenants={"a": Tenant(rate="2/s", burst=2)})
    with SandboxExecutor(max_concurrent=2, capacity=Capacity(2, 8 * GiB, None), policy=policy) as ex:
        spec = lambda: JobSpec(kernel=_script(tmp_path, 0), tenant="a", limits=Limits(memory="1GiB"))  # noqa: E731
        burst = [ex.submit(spec()) for _ in range(5)]
        time.sleep(0.6)
        later = ex.submit(spec())
        verdicts = [f.result().verdict for f in burst]
        assert later.result().verdict is Verdict.ok
    assert verdicts.count(Verdict.ok) == 2 and verdicts.count(Verdict.rejected) == 3
    assert "submission rate 2/s exceeded" in burst[-1].result().reason


def test_priority_order_and_fifo_within_priority(tmp_path):
    with SandboxExecutor(max_concurrent=1, capacity=Capacity(1, 8 * GiB, None), policy=_policy(tmp_path)) as ex:
        blocker = ex.submit(JobSpec(kernel=_script(tmp_path, 0.5), limits=Limits(memory="1GiB")))
        time.sleep(0.2)
        order = [("low1", 0), ("high1", 10), ("low2", 0), ("high2", 10)]
        futures = {name: ex.submit(JobSpec(kernel=_script(tmp_path, 0), priority=p, labels={"name": name},
                                           limits=Limits(memory="1GiB"))) for name, p in order}
        blocker.result()
        started = sorted(futures, key=lambda n: futures[n].result().started_at)
    assert started == ["high1", "high2", "low1", "low2"]


def test_ageing_bound_is_documented_and_positive():
    assert 0 < RESERVE_AFTER <= 60


def test_queue_bound_backpressure(tmp_path):
    policy = _policy(tmp_path, tenants={"a": Tenant(max_queued=1)})
    with SandboxExecutor(max_concurrent=1, capacity=Capacity(1, 8 * GiB, None), policy=policy) as ex:
        spec = lambda: JobSpec(kernel=_script(tmp_path, 0.6), tenant="a", limits=Limits(memory="1GiB"))  # noqa: E731
        running = ex.submit(spec())
        time.sleep(0.3)
        queued = ex.submit(spec())
        with pytest.raises(QueueFull, match="max_queued=1"):
            ex.submit(spec())
        t = time.monotonic()
        with pytest.raises(QueueFull):
            ex.submit(spec(), block=True, timeout=0.1)
        assert time.monotonic() - t >= 0.1
        waited = ex.submit(spec(), block=True, timeout=10)
        assert all(f.result().verdict is Verdict.ok for f in (running, queued, waited))


def test_cancel_running_and_queued_jobs(tmp_path, supervisor):
    with SandboxExecutor(max_concurrent=1, capacity=Capacity(1, 8 * GiB, None), supervisor=supervisor) as ex:
        running = ex.submit(JobSpec(kernel=kernel("sigterm_ignorer.py"), limits=Limits(memory="1GiB", grace="0.5s")))
        queued = ex.submit(JobSpec(kernel=kernel("tiny.py"), limits=Limits(memory="1GiB")))
        time.sleep(1.0)
        assert queued.cancel() and running.cancel()
        r = running.result(timeout=10)
        with pytest.raises(CancelledError):
            queued.result()
    assert r.verdict is Verdict.cancelled and r.signal == "SIGKILL" and r.termination.reason == "cancelled"
    assert r.exit_status == 115
    assert_no_survivors(supervisor, r.job_id)


def test_job_type_default_profile(tmp_path):
    policy = Policy.from_dict({"profiles": {"quick": {"cpu_time": "3s"}},
                               "job_types": {"test": {"profile": "quick", "priority": 5}},
                               "sandbox": {"state_dir": str(tmp_path)}}, "limits.toml")
    assert policy.job_types["test"] == JobType(profile="quick", priority=5)
    with SandboxExecutor(max_concurrent=1, capacity=Capacity(1, 64 * GiB, None), policy=policy) as ex:
        r = ex.submit(JobSpec(kernel=kernel("tiny.py"), job_type="test")).result()
    assert r.verdict is Verdict.ok and r.limits.cpu_time == 3


def test_alerts_fire_once_per_crossing(tmp_path):
    events = []
    alerts = Alerts(AuditLog(tmp_path / "a.jsonl"), [0.8, 0.9], hook=events.append, hold_down=0)
    for used in (5, 85, 87, 95, 96, 50, 85):
        alerts.quota("a", "memory", used, 100)
    alerts.close()
    assert [e["level"] for e in events] == [0.8, 0.9, 0.8]
    audit = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in audit] == ["quota_crossed"] * 3


def test_alerts_rearm_below_the_hysteresis_and_after_the_hold_down(tmp_path):
    events, now = [], [0.0]
    alerts = Alerts(AuditLog(tmp_path / "a.jsonl"), [0.8], hook=events.append, hysteresis=0.1, hold_down=300,
                    clock=lambda: now[0])
    for t, used in ((0, 85), (10, 75), (20, 85), (30, 50), (40, 85), (400, 85), (410, 60), (420, 90), (720, 90)):
        now[0] = t
        alerts.quota("a", "memory", used, 100)
    alerts.close()
    # 75 is not below 80 - 10; 50 is, but the crossing after it is held down until 300 s after the
    # first alert; the same again from 400 s on
    assert [e["used"] for e in events] == [85, 85, 90]


def test_alerts_for_rejections_and_violations_reach_hook_command_and_audit(tmp_path):
    sink = tmp_path / "alerts.jsonl"
    policy = _policy(tmp_path, tenants={"a": Tenant(memory_quota="2GiB")},
                     alerts=AlertSettings(command=["sh", "-c", f"cat >> {sink}; echo >> {sink}"]))
    hooked = []
    with SandboxExecutor(max_concurrent=2, capacity=Capacity(2, 8 * GiB, None), policy=policy,
                         alert_hook=hooked.append) as ex:
        ex.submit(JobSpec(kernel=kernel("tiny.py"), tenant="a", limits=Limits(memory="3GiB"))).result()
        ex.submit(JobSpec(kernel=kernel("sleeper.py"), tenant="a",
                          limits=Limits(memory="2GiB", wall_time="1s"))).result()
    kinds = [e["kind"] for e in hooked]
    assert kinds.count("rejected") == 1 and kinds.count("violation") == 1
    assert kinds.count("quota_crossed") == 2  # 2 GiB of 2 GiB: the 80% and the 90% crossing
    from_command = [json.loads(line) for line in sink.read_text().splitlines() if line.strip()]
    assert [e["kind"] for e in from_command] == kinds
    violation = next(e for e in hooked if e["kind"] == "violation")
    assert violation["resource"] == "wall_time" and violation["tenant"] == "a"


def test_metrics_scraped_over_http_on_loopback_match_jobs(tmp_path):
    with SandboxExecutor(max_concurrent=2, capacity=Capacity(2, 8 * GiB, None), policy=_policy(tmp_path)) as ex:
        server, _ = ex.metrics.serve(0)
        try:
            assert server.server_address[0] == "127.0.0.1"
            results = list(ex.map([JobSpec(kernel=kernel(k), limits=Limits(memory="1GiB", wall_time="1s"))
                                   for k in ("tiny.py", "tiny.py", "exception.py", "sleeper.py")]))
            ex.submit(JobSpec(kernel=kernel("tiny.py"), limits=Limits(memory="64GiB"))).result()
            url = f"http://127.0.0.1:{server.server_port}/metrics"
            text = urllib.request.urlopen(url, timeout=5).read().decode()
        finally:
            server.shutdown()
    assert [r.verdict.value for r in results] == ["ok", "ok", "error", "wall_time"]

    def value(pattern: str) -> float:
        m = re.search(pattern + r" ([0-9.e+]+)", text)
        assert m, pattern
        return float(m.group(1))
    assert value(r'taichi_sandbox_jobs_total\{tenant="_default",verdict="ok"\}') == 2
    assert value(r'taichi_sandbox_jobs_total\{tenant="_default",verdict="wall_time"\}') == 1
    assert value(r'taichi_sandbox_violations_total\{resource="wall_time",tenant="_default"\}') == 1
    assert value(r'taichi_sandbox_admission_rejections_total\{reason="capacity_memory",tenant="_default"\}') == 1
    assert value(r'taichi_sandbox_job_duration_seconds_count\{tenant="_default"\}') == 4
    assert value(r'taichi_sandbox_running_jobs\{tenant="_default"\}') == 0


def test_two_hundred_submissions_nothing_lost(tmp_path):
    audit = tmp_path / "audit.jsonl"
    policy = _policy(tmp_path, tenants={"a": Tenant(max_concurrent=1), "b": Tenant()})
    from sandbox import Supervisor
    with Supervisor(policy, audit_log=audit) as sup, \
            SandboxExecutor(max_concurrent=2, capacity=Capacity(2, 8 * GiB, None), supervisor=sup) as ex:
        futures = [ex.submit(JobSpec(kernel=_script(tmp_path, 0), tenant="ab"[i % 2], priority=i % 3,
                                     limits=Limits(memory="1GiB"))) for i in range(200)]
        results = [f.result(timeout=300) for f in futures]
        state = ex.quota_state()
    assert [r.verdict for r in results] == [Verdict.ok] * 200
    ids = [json.loads(line)["job_id"] for line in audit.read_text().splitlines()
           if json.loads(line).get("type") == "job"]
    assert sorted(ids) == sorted(f.spec.job_id for f in futures)
    assert state["tenants"]["a"]["running"] == 0 and state["tenants"]["a"]["queued"] == 0


CEILINGS = {"profiles": {"small": Limits(memory="1GiB", cpu_time="10s", wall_time="60s", max_processes=8),
                         "big": Limits(memory="8GiB")}}


@pytest.mark.parametrize("how,ask,named", [
    ("a higher limit", {"limits": Limits(memory="2GiB")}, "memory 2 GiB > 1 GiB"),
    ("no limit at all", {"limits": Limits(cpu_time=None, wall_time=None)}, "cpu_time unlimited > 10s"),
    ("another profile", {"profile": "big"}, "max_processes unlimited > 8"),
    ("the host network", {"limits": Limits(network="host")}, 'network "host" > "none"'),
])
def test_a_tenants_profile_is_a_ceiling_for_its_jobs(tmp_path, how, ask, named):
    policy = _policy(tmp_path, tenants={"a": Tenant(profile="small")}, **CEILINGS)
    job = JobSpec(kernel=_script(tmp_path, 0), tenant="a", **ask)
    with SandboxExecutor(max_concurrent=1, capacity=Capacity(1, 8 * GiB, None), policy=policy) as ex:
        raised = ex.submit(job).result(timeout=60)
        lowered = ex.submit(JobSpec(kernel=_script(tmp_path, 0), tenant="a",
                                    limits=Limits(memory="512MiB", cpu_time="5s"))).result(timeout=60)
    assert raised.verdict is Verdict.rejected, f"{how}: {raised.verdict} {raised.reason}"
    assert named in raised.reason and "tenant 'a'" in raised.reason
    assert lowered.verdict is Verdict.ok, lowered.reason
    assert lowered.limits.memory == 512 << 20


def test_a_slow_alert_command_never_delays_submission_or_scheduling(tmp_path, monkeypatch):
    monkeypatch.setattr("sandbox.node.executor.ALERTS_FLUSH", 0.5)  # closing need not wait the alerts out
    policy = _policy(tmp_path, tenants={"a": Tenant(memory_quota="1GiB")},
                     alerts=AlertSettings(command=["sleep", "10"]))  # every alert takes 10 s to deliver
    with SandboxExecutor(max_concurrent=1, capacity=Capacity(1, 8 * GiB, None), policy=policy) as ex:
        t0 = time.monotonic()
        rejected = ex.submit(JobSpec(kernel=kernel("tiny.py"), tenant="a", limits=Limits(memory="2GiB")))
        answered = time.monotonic() - t0  # the rejection alert is on its way
        futures = [ex.submit(JobSpec(kernel=kernel("tiny.py"), tenant="a", limits=Limits(memory="1GiB")))
                   for _ in range(3)]  # each start crosses 80% and 90% of the quota: two alerts more
        results = [f.result(timeout=60) for f in futures]
        elapsed = time.monotonic() - t0
    assert rejected.result().verdict is Verdict.rejected and answered < 1
    assert [r.verdict for r in results] == [Verdict.ok] * 3
    assert elapsed < 8, f"3 tiny jobs took {elapsed:.1f} s behind 7 alerts of 10 s each"


def test_a_job_s_lease_carries_over_to_its_next_run_and_once_lost_stays_lost():
    future = JobFuture(JobSpec(kernel="k.py"), quiet=True)
    future.lease(deadline=123.0)
    first = future.control
    future.rerun()  # preempted and requeued: a new control, the same lease
    assert future.control is not first and future.control.lease == 123.0
    future.lease(lost="its cluster lease lapsed: gone")
    future.lease(deadline=456.0)  # a late renewal does not bring it back
    future.rerun()
    assert future.control.lease_lapsed == "its cluster lease lapsed: gone" and future.control.cancelled
