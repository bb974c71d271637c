"""Priority classes, fair share and preemption, for real: a `taichi-sandbox serve` process on a
temporary socket, clients that are real processes (other uids, and root naming tenants), real jobs
ended with real signals. Issue 21: a priority-0 tenant holding both slots made a priority-100 job
wait 37 s; a priority-0 flood outranked a priority-10 job once it had waited 100 s.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request

import pytest

from sandbox.core.limits import Scheduler, Tenant
from sandbox.node import frames
from sandbox.node.quotas import Capacity, Demand, TenantUsage
from sandbox.node.scheduling import FairShare, Running, rank, victims

from .test_service import ALICE, BOB, SOCKET_GID, Node, as_uid, client_dir, free_port

STUBBORN = ("import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('started', flush=True)\ntime.sleep(float(sys.argv[1]))\nprint('slept', flush=True)\n")
SLEEP = "import sys, time\nprint('started', flush=True)\ntime.sleep(float(sys.argv[1]))\nprint('slept', flush=True)\n"
READS = "import sys, time\nprint('started', flush=True)\ntime.sleep(float(sys.argv[1]))\nprint(open('data.txt').read())\n"
BURN = "import time\nend = time.process_time() + float(__import__('sys').argv[1])\nwhile time.process_time() < end:\n" \
       "    pass\n"
POLICY = """
[defaults]
memory = "1GiB"
grace = "1s"
[node]
cpu_slots = {slots}
[tenants.low]
users = ["{alice}"]
preemptible = true
[tenants.again]
preemptible = true
requeue = true
[tenants.steady]
users = ["{bob}"]
[tenants.high]
users = ["{bob}"]
priority = 100
[tenants.mid]
priority = 10
[tenants.heavy]
priority = 5
[tenants.light]
priority = 5
[sandbox]
state_dir = "{state}"
[service]
socket = "{socket}"
group = "{gid}"
metrics_port = {port}
idle_timeout = "1s"
[scheduler]
{scheduler}
"""


class PolicyNode(Node):
    """A service with this file's tenants."""

    def __init__(self, root, slots: int = 2, scheduler: str = "") -> None:
        self.prefix = ()
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        self.root, self.socket, self.limits = root, root / "s.sock", root / "limits.toml"
        self.port = free_port()
        self.limits.write_text(POLICY.format(slots=slots, alice=ALICE, bob=BOB, state=root / "state", socket=self.socket,
                                             gid=SOCKET_GID, port=self.port, scheduler=scheduler))
        self.audit = root / "state" / "audit.jsonl"
        self.start()

    def submit(self, tenant: str, seconds: float, source: str = SLEEP, **job) -> str:
        with self.connect() as sock:
            frames.send(sock, {"op": "submit", "jobs": [{"kernel": "k.py", "source": source, "argv": [str(seconds)],
                                                         "tenant": tenant, **job}]})
            answer = frames.recv(sock, idle=60, within=60)
        return answer["jobs"][0]["job_id"]

    def follow(self, tenant: str, seconds: float, source: str = SLEEP, **job) -> dict:
        answers = self.ask({"op": "submit", "jobs": [{"kernel": "k.py", "source": source, "argv": [str(seconds)],
                                                      "tenant": tenant, **job}], "follow": True, "output": False})
        return [a["result"] for a in answers if a["type"] == "result"][0]

    def running(self, count: int, timeout: float = 60) -> list[dict]:
        """The running jobs, once there are `count` of them that printed."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = [j for j in self.ask({"op": "ps"})[0]["jobs"] if j["state"] == "running"]
            started = {r["job_id"] for r in self.records("started")}
            if len(jobs) == count and all(j["job_id"] in started for j in jobs):
                time.sleep(0.3)  # the interpreter is up: its SIGTERM handler is set
                return jobs
            assert time.monotonic() < deadline, jobs
            time.sleep(0.05)

    def verdicts(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for record in self.records("job"):
            out.setdefault(record["job_id"], []).append(record["verdict"])
        return out

    def cancel_all(self) -> None:
        for job in self.ask({"op": "ps"})[0]["jobs"]:
            self.ask({"op": "cancel", "job_id": job["job_id"]})


@pytest.fixture
def make_node(tmp_path):
    nodes = []

    def make(**kwargs) -> PolicyNode:
        nodes.append(PolicyNode(tmp_path / f"node{len(nodes)}", **kwargs))
        return nodes[-1]
    yield make
    for node in nodes:
        node.cancel_all()
        assert node.stop() == 0


root_only = pytest.mark.skipif(__import__("os").geteuid() != 0, reason="needs root to run clients as other uids "
                                                                       "(and jobs as their tenants' uids)")


@root_only
def test_a_high_priority_job_preempts_the_youngest_preemptible_job_within_its_grace(make_node, tmp_path):
    node = make_node(slots=2)
    home = client_dir(tmp_path, ALICE, **{"stubborn.py": STUBBORN})
    run = lambda: subprocess.Popen(as_uid(ALICE, "-m", "sandbox", "run", "stubborn.py", "--socket",  # noqa: E731
                                          str(node.socket), "--", "60"), cwd=home, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    oldest = run()
    node.running(1)
    youngest = run()
    held = node.running(2)
    assert {j["tenant"] for j in held} == {"low"}
    asked = time.time()
    result = node.follow("high", 0)
    waited = result["started_at"] - asked
    assert result["verdict"] == "ok" and waited <= 1.0 + 1.0, waited  # grace 1 s (the victim ignores SIGTERM) + 1 s
    out, err = youngest.communicate(timeout=60)
    assert youngest.returncode == 126 and "verdict: preempted" in err, err
    assert oldest.poll() is None  # the oldest keeps its work
    victim = [r for r in node.records("job") if r["verdict"] == "preempted"]
    assert len(victim) == 1 and victim[0]["tenant"] == "low" and victim[0]["uid"] == ALICE
    assert f"job {result['job_id']} (tenant high, priority 100)" in victim[0]["reason"], victim
    assert victim[0]["signal"] == "SIGKILL"  # SIGTERM ignored, then killed after its grace
    alert = [r for r in node.records("alert") if r["kind"] == "preempted"]
    assert [a["job_id"] for a in alert] == [victim[0]["job_id"]] and alert[0]["requeue"] is False
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{node.port}/metrics", timeout=10).read().decode()
    assert 'taichi_sandbox_preemptions_total{tenant="low"} 1.0' in metrics
    node.cancel_all()
    oldest.communicate(timeout=60)


@pytest.mark.slow
@root_only
def test_non_preemptible_or_equal_priority_work_is_never_preempted_nor_room_that_would_not_do(make_node):
    node = make_node(slots=2)
    steady, low = node.submit("steady", 6), node.submit("low", 6)
    node.running(2)
    equal = node.submit("steady", 0)  # priority 0, as the preemptible job's: waits
    wide = node.submit("high", 0, limits={"cpu_threads": 2})  # needs both slots: one preemptible job would not do
    time.sleep(2.5)
    assert {j["job_id"] for j in node.ask({"op": "ps"})[0]["jobs"] if j["state"] == "running"} == {steady, low}
    assert not [r for r in node.records("alert") if r["kind"] == "preempted"]
    narrow = node.submit("high", 0)  # one slot: the preemptible job makes room, the other never
    deadline = time.monotonic() + 30
    while narrow not in node.verdicts():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    while len(node.verdicts()) < 5:
        assert time.monotonic() < deadline + 30
        time.sleep(0.1)
    verdicts = node.verdicts()
    assert verdicts[low] == ["preempted"] and verdicts[steady] == ["ok"], verdicts
    assert verdicts[equal] == verdicts[wide] == verdicts[narrow] == ["ok"], verdicts


@root_only
def test_a_requeued_job_runs_again_under_its_id_and_its_client_gets_the_last_runs_result(make_node, tmp_path):
    node = make_node(slots=1)
    data = tmp_path / "data.txt"
    data.write_text("the input, sent once")
    results: list[dict] = []

    def follow() -> None:  # a job with an input descriptor: the second run reads it too
        job = {"kernel": "k.py", "source": READS, "argv": ["2"], "tenant": "again", "inputs": ["data.txt"]}
        with node.connect() as sock, open(data) as f:
            frames.send(sock, {"op": "submit", "jobs": [job], "follow": True, "output": False}, fds=[f.fileno()])
            while (answer := frames.recv(sock, idle=60, within=60))["type"] != "end":
                results.extend([answer["result"]] if answer["type"] == "result" else [])
    follower = threading.Thread(target=follow)
    follower.start()
    node.running(1)
    assert node.follow("high", 0)["verdict"] == "ok"
    follower.join(60)
    assert [r["verdict"] for r in results] == ["ok"], results
    assert "the input, sent once" in results[0]["stdout_tail"]
    job_id = results[0]["job_id"]
    assert node.verdicts()[job_id] == ["preempted", "ok"]
    assert [r["job_id"] for r in node.records("started")].count(job_id) == 2
    first = [r for r in node.records("job") if r["job_id"] == job_id][0]
    assert "back in the queue" in first["reason"] or "goes back to the queue" in first["reason"], first
    assert [a["requeue"] for a in node.records("alert") if a["kind"] == "preempted"] == [True]


@pytest.mark.slow
@root_only
def test_a_tenant_with_heavy_recent_usage_waits_behind_one_of_equal_priority_without(make_node):
    node = make_node(slots=1)
    assert node.follow("heavy", 1.5, source=BURN)["verdict"] == "ok"  # 1.5 CPU-seconds of recent usage
    blocker = node.submit("steady", 2)
    node.running(1)
    first, second = node.submit("heavy", 0), node.submit("light", 0)
    deadline = time.monotonic() + 60
    while not {blocker, first, second} <= set(node.verdicts()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    started = {r["job_id"]: r["ts"] for r in node.records("started")}
    assert started[second] < started[first]  # submitted later, started first


@pytest.mark.slow
@root_only
def test_a_flood_of_a_lower_class_never_outranks_a_higher_one_however_long_it_waited(make_node):
    # Ageing at its most after 1 s, and as heavy as it may be: still within the class.
    node = make_node(slots=1, scheduler='max_age = "1s"\nage_weight = 1000')
    flood = [node.submit("steady", 0.4) for _ in range(8)]
    time.sleep(2.0)
    asked = time.time()
    urgent = node.submit("mid", 0)
    deadline = time.monotonic() + 60
    while not set(flood + [urgent]) <= set(node.verdicts()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    started = {r["job_id"]: r["ts"] for r in node.records("started")}
    later = [job for job in flood if started[job] > asked]
    assert later and all(started[job] > started[urgent] for job in later), (later, started)


def test_victims_are_the_fewest_lowest_and_youngest_that_make_room():
    cap, tenant, usage = Capacity(4, 16 << 30, None), Tenant(), TenantUsage()
    used = Demand(4, 10 << 30, 0)
    small_young = Running("a", "t", Demand(1, 1 << 30, 0), 0, started=30.0)
    big_old = Running("b", "t", Demand(1, 4 << 30, 0), 0, started=10.0)
    higher = Running("c", "t", Demand(1, 4 << 30, 0), 5, started=40.0)
    other = Running("d", "t", Demand(1, 1 << 30, 0), 0, started=20.0)
    need = Demand(1, 8 << 30, 0)  # 6 GiB free: 2 GiB more needed
    # One job of priority 0 frees enough; the youngest such one that alone suffices is the big one.
    assert [v.handle for v in victims(need, 10, used, cap, tenant, "x", usage, [small_young, big_old, higher, other])] \
        == ["b"]
    assert victims(need, 0, used, cap, tenant, "x", usage, [small_young, big_old]) == []  # equal priority: never
    assert victims(Demand(1, 20 << 30, 0), 10, used, cap, tenant, "x", usage, [big_old]) == []  # would not fit anyway
    slots = [Running(n, "t", Demand(1, 1 << 30, 0), 0, started=s) for n, s in (("old", 1.0), ("young", 2.0))]
    assert [v.handle for v in victims(Demand(1, 1 << 30, 0), 1, used, cap, tenant, "x", usage, slots)] == ["young"]


def test_fair_share_decays_with_its_half_life_and_ageing_stays_within_a_class():
    settings = Scheduler(fair_share_half_life="10s", max_age="1s", age_weight=1000)
    share = FairShare(settings)
    share.charge("heavy", 100.0, 0, 0.0, now=0.0)
    assert share.usage("heavy", 10.0) == pytest.approx(50.0)
    factors = share.factors({"heavy": 1, "light": 1}, now=10.0)
    assert factors["light"] == 1.0 and factors["heavy"] == pytest.approx(0.25)
    aged_low = rank(0, factors["light"], waited=10**6, seq=0, settings=settings)
    fresh_high = rank(1, factors["heavy"], waited=0, seq=1, settings=settings)
    assert fresh_high < aged_low
    assert json.loads(json.dumps(settings.model_dump()))["age_weight"] == 1000


def test_preempt_on_request_ends_only_a_preemptible_running_job_with_the_reason_given(tmp_path):
    from sandbox import JobSpec, Limits, Policy, Verdict
    from sandbox.core.limits import GiB, Settings
    from sandbox.node.executor import SandboxExecutor

    script = tmp_path / "nap.py"
    script.write_text("import time\ntime.sleep(30)\n")
    policy = Policy(settings=Settings(state_dir=str(tmp_path / "state")),
                    tenants={"low": Tenant(preemptible=True), "steady": Tenant()})
    with SandboxExecutor(capacity=Capacity(2, 8 * GiB, None), policy=policy) as ex:
        spec = lambda tenant: JobSpec(kernel=str(script), tenant=tenant, limits=Limits(memory="1GiB", grace="0.5s"))  # noqa: E731
        low, steady = ex.submit(spec("low")), ex.submit(spec("steady"))
        deadline = time.monotonic() + 30
        while not (low.running() and steady.running()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [(job_id, tenant) for job_id, tenant, _, _ in ex.preemptible()] == [(low.spec.job_id, "low")]
        assert not ex.preempt(steady.spec.job_id, "node memory pressure")
        assert ex.preempt(low.spec.job_id, "node memory pressure") and not ex.preempt(low.spec.job_id, "again")
        result = low.result(timeout=30)
        assert result.verdict is Verdict.preempted and result.reason == "node memory pressure"
        assert result.exit_status == 126 and result.termination.reason == "preempted"
        assert steady.running()
        steady.cancel()
        assert steady.result(timeout=30).verdict is Verdict.cancelled


def test_a_requeued_job_cancelled_while_it_waits_again_ends_cancelled_with_its_record(tmp_path):
    from sandbox import JobSpec, Limits, Policy, Verdict
    from sandbox.core.limits import GiB, Settings
    from sandbox.node.executor import SandboxExecutor

    script = tmp_path / "nap.py"
    script.write_text("import sys, time\ntime.sleep(float(sys.argv[1]))\n")
    policy = Policy(settings=Settings(state_dir=str(tmp_path / "state")),
                    tenants={"again": Tenant(preemptible=True, requeue=True), "high": Tenant(priority=100)})
    with SandboxExecutor(capacity=Capacity(1, 8 * GiB, None), policy=policy) as ex:
        spec = lambda tenant, s: JobSpec(kernel=str(script), argv=[s], tenant=tenant,  # noqa: E731
                                         limits=Limits(memory="1GiB", grace="0.5s"))
        again = ex.submit(spec("again", "30"))
        deadline = time.monotonic() + 30
        while not again.running():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        high = ex.submit(spec("high", "3"))
        while not high.running():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert again.cancel()  # queued again, its future still running
        result = again.result(timeout=30)
        assert result.verdict is Verdict.cancelled and "queued again after its preemption" in result.reason
        assert high.result(timeout=30).verdict is Verdict.ok
    records = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [r["verdict"] for r in records if r["type"] == "job" and r["job_id"] == again.spec.job_id] == \
        ["preempted", "cancelled"]
