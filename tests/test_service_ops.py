"""Operating the node service without losing anything: a real `taichi-sandbox serve` process on a
real socket, real signals, a real full filesystem and clients of real second uids (issue 21).

Each test is a fault reproduced against the old service first (SIGHUP killed it; a second service
aborted the first's jobs; queued jobs left no trace after SIGKILL; a full audit filesystem tore
lines and turned `ok` into `crashed`; `batch` exited 0 with no results; refusals went unrecorded;
alerts stormed; `quota` showed every tenant to everyone).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .test_service import ALICE, BOB, SLEEP, Node, _verdict, as_uid, client_dir

pytestmark = pytest.mark.skipif(__import__("os").geteuid() != 0, reason="needs root to run clients as other uids "
                                                                         "(and jobs as their tenants' uids)")


def submit(node: Node, **job) -> str:
    answer = node.ask({"op": "submit", "jobs": [{"kernel": "s.py", "source": SLEEP, **job}]})[0]["jobs"][0]
    assert answer["state"] == "queued", answer
    return answer["job_id"]


@pytest.fixture
def node(tmp_path):
    """A service with the policy of tests/test_service.py; killed after the test if still running."""
    n = Node(tmp_path / "node")
    yield n
    if n.proc.poll() is None:
        n.stop(signal.SIGKILL)


def start(node: Node, seconds: str, tenant: str) -> str:
    """A job sleeping `seconds`, once it runs."""
    job_id = submit(node, argv=[seconds], tenant=tenant)
    wait_for(lambda: states(node).get(job_id) == "running", f"job {job_id} never started")
    return job_id


def wait_for(condition, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def states(node: Node) -> dict[str, str]:
    return {j["job_id"]: j["state"] for j in node.ask({"op": "ps"})[0]["jobs"]}


def job_record(node: Node, job_id: str) -> dict:
    _verdict(node, job_id)
    return next(r for r in node.records("job") if r["job_id"] == job_id)


@pytest.mark.slow
def test_sighup_reloads_the_policy_keeping_running_jobs_and_rechecking_queued_ones(node):
    running = start(node, "8", "alice")
    queued = submit(node, argv=["0"], tenant="alice")  # alice: max_concurrent = 1
    good = node.limits.read_text()
    node.limits.write_text(good + "[tenants.nobody\n")
    node.proc.send_signal(signal.SIGHUP)
    log = wait_for(lambda: [line for line in (node.root / "service.log").read_text().splitlines()
                            if line.startswith("taichi-sandbox: reload")], "no reload line in the service's log")
    assert len(log) == 1 and "keeping the previous policy" in log[0] and "limits.toml" in log[0], log
    assert node.proc.poll() is None and states(node) == {running: "running", queued: "queued"}
    node.limits.write_text(good.replace("max_queued = 1\n", 'max_queued = 1\nmemory_quota = "512MiB"\n'))
    node.proc.send_signal(signal.SIGHUP)
    rejected = job_record(node, queued)
    assert rejected["verdict"] == "rejected" and "memory quota 512 MiB" in rejected["reason"], rejected
    assert "policy reloaded" in rejected["reason"]
    assert job_record(node, running)["verdict"] == "ok"  # it kept the limits it started with
    answer = node.ask({"op": "submit", "jobs": [{"kernel": "s.py", "source": SLEEP, "argv": ["0"],
                                                 "tenant": "alice"}]})[0]["jobs"][0]
    assert answer["state"] == "rejected" and "memory quota" in answer["reason"]
    assert node.proc.poll() is None
    assert node.stop() == 0


@pytest.mark.slow
def test_a_second_service_on_the_same_state_dir_refuses_to_start_and_touches_nothing(node):
    running = start(node, "5", "bob")
    spool = sorted(p.name for p in (node.root / "state" / "spool").iterdir())
    other = node.root / "other.toml"  # the same state dir, another socket
    other.write_text(node.limits.read_text().replace(str(node.socket), str(node.root / "other.sock")))
    second = subprocess.run([sys.executable, "-m", "sandbox", "serve", "--limits-file", str(other)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2, second
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"another service (pid {node.proc.pid}) holds the state dir" in second.stderr, second.stderr
    assert states(node) == {running: "running"}  # its socket still answers
    assert sorted(p.name for p in (node.root / "state" / "spool").iterdir()) == spool
    assert job_record(node, running)["verdict"] == "ok"
    assert not node.records("aborted")
    assert node.stop() == 0


def test_every_admitted_job_is_recorded_and_a_restart_aborts_the_queued_ones_too(node):
    running = start(node, "60", "alice")
    queued = submit(node, argv=["0"], tenant="alice")  # alice: max_concurrent = 1
    submitted = {r["job_id"]: r for r in node.records("submitted")}
    assert set(submitted) == {running, queued}
    record = submitted[queued]
    assert record["tenant"] == "alice" and record["uid"] == 0 and record["ts"] > 0
    assert record["reserved"] == {"cpu": 1, "memory": 1 << 30, "gpu_memory": 0}
    assert record["limits"]["memory"] == 1 << 30
    assert node.stop(signal.SIGKILL) == -signal.SIGKILL
    node.start()
    aborted = {r["job_id"]: r for r in node.records("aborted")}
    assert set(aborted) == {running, queued}, aborted
    assert "queued" in aborted[queued]["reason"] and aborted[queued]["uid"] == 0
    assert aborted[queued]["submitted_at"] == record["ts"]
    node.stop(signal.SIGKILL)
    node.start()  # nothing is aborted twice
    assert len(node.records("aborted")) == 2


def fill(directory, name: str = "filler") -> None:
    """Fill the filesystem of `directory` to the last byte."""
    with open(directory / name, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of 1 MiB: a filesystem that really fills up."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_audit_filesystem_refuses_new_jobs_tears_no_line_and_keeps_verdicts_true(node, small_fs):
    node.stop()
    state = f'state_dir = "{node.root / "state"}"\n'
    node.limits.write_text(node.limits.read_text().replace(state, f'{state}audit_log = "{small_fs}/audit.jsonl"\n'))
    node.audit = small_fs / "audit.jsonl"
    node.start()
    answers: list[dict] = []
    follower = threading.Thread(target=lambda: answers.extend(node.ask(
        {"op": "submit", "jobs": [{"kernel": "s.py", "source": SLEEP, "argv": ["6"], "tenant": "bob"}],
         "follow": True, "output": False})))
    follower.start()
    job_id = wait_for(lambda: next(iter(states(node)), None), "the job never came")
    wait_for(lambda: states(node).get(job_id) == "running", "the job never started")
    fill(small_fs)
    for _ in range(50):  # records still fit in the audit file's last block, then the disk is full
        refused = node.ask({"op": "submit", "jobs": [{"kernel": "s.py", "source": SLEEP, "argv": ["0"],
                                                      "tenant": "alice"}]})[0]["jobs"][0]
        if refused["state"] == "refused":
            break
        wait_for(lambda: refused["job_id"] not in states(node), "a job never ended")  # alice may queue only one
    assert refused["code"] == "AuditUnavailable" and "No space left on device" in refused["reason"], refused
    follower.join(60)
    result = next(a["result"] for a in answers if a["type"] == "result")
    assert result["verdict"] == "ok", (result["reason"], result["notes"])  # its record could not be written
    assert any(n.startswith("audit log: the job's record waits in memory") for n in result["notes"]), result
    (small_fs / "filler").unlink()
    again = submit(node, argv=["0"], tenant="bob")
    assert job_record(node, again)["verdict"] == "ok"
    assert all(json.loads(line) for line in node.audit.read_text().splitlines())  # no half line, none glued
    assert [r["verdict"] for r in node.records("job") if r["job_id"] == job_id] == ["ok"]  # written late
    assert node.stop() == 0


def test_a_client_that_gets_fewer_verdicts_than_it_submitted_fails(node, tmp_path):
    home = client_dir(tmp_path, BOB, **{"sleep.py": SLEEP, "jobs.toml": '[[job]]\nkernel = "sleep.py"\n'
                                                                       'argv = ["60"]\n' * 3})
    client = subprocess.Popen(as_uid(BOB, "-m", "sandbox", "batch", "--manifest", "jobs.toml", "--socket",
                                     str(node.socket)), cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    wait_for(lambda: list(states(node).values()).count("running") == 2, "no job started")  # bob: 2 at a time
    time.sleep(1)  # the client has its `submitted` answer
    node.stop(signal.SIGKILL)
    _, err = client.communicate(timeout=60)
    assert client.returncode == 125, err  # EXIT_INTERNAL: the sandbox failed, not the jobs
    assert "0 of 3 jobs' verdicts" in err, err


def test_refused_requests_are_audited_and_counted_by_reason(tmp_path):
    from .test_service import ask_as, free_port
    port = free_port()
    node = Node(tmp_path / "node", extra=f"metrics_port = {port}")
    try:
        job = {"kernel": "s.py", "source": SLEEP, "argv": ["0"]}
        wrong = ask_as(node, ALICE, {"op": "submit", "jobs": [{**job, "tenant": "bob"}]})[0]["jobs"][0]
        high = ask_as(node, ALICE, {"op": "submit", "jobs": [{**job, "limits": {"memory": "2GiB"}}]})[0]["jobs"][0]
        bad = ask_as(node, ALICE, {"op": "submit", "jobs": "all of them"})[0]
        assert (wrong["state"], high["state"], bad["code"]) == ("refused", "refused", "BadRequest")
        refused = node.records("refused")
        assert [(r["code"], r["uid"], r["tenant"]) for r in refused] == [
            ("Refused", ALICE, "bob"), ("ConfigError", ALICE, None), ("BadRequest", ALICE, None)], refused
        assert "may not use tenant" in refused[0]["reason"] or "bob" in refused[0]["reason"], refused[0]
        assert "memory" in refused[1]["reason"] and refused[1]["op"] == "submit"
        text = __import__("urllib.request").request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        for code in ("Refused", "ConfigError", "BadRequest"):
            assert f'taichi_sandbox_refused_requests_total{{reason="{code}"}} 1.0' in text.decode(), code
    finally:
        assert node.stop() == 0


def test_jobs_cancelled_by_the_drain_timeout_say_so(tmp_path):
    node = Node(tmp_path / "node", extra='drain_timeout = "1s"')
    running = start(node, "60", "bob")
    assert node.stop() == 0
    verdict = [r for r in node.records("job") if r["job_id"] == running]
    assert [r["verdict"] for r in verdict] == ["cancelled"]
    assert verdict[0]["reason"] == "cancelled: the service's drain timeout (1s) ran out at shutdown", verdict


def test_quota_alerts_fire_once_per_crossing_not_once_per_job(node):
    jobs = [{"kernel": "s.py", "source": SLEEP, "argv": ["0"], "tenant": "bob"}] * 12  # bob: 2 at a time
    ids = [j["job_id"] for j in node.ask({"op": "submit", "jobs": jobs})[0]["jobs"]]
    for job_id in ids:
        assert _verdict(node, job_id) == "ok"
    crossed = [(a["resource"], a["level"]) for a in node.records("alert") if a["kind"] == "quota_crossed"]
    assert crossed == [("concurrency", 0.8), ("concurrency", 0.9)], crossed
    assert node.stop() == 0


def test_quota_and_ps_show_a_user_only_their_own_tenants_unless_an_operator(tmp_path):
    from .test_service import MALLORY
    node = Node(tmp_path / "node", extra=f'operators_group = "{MALLORY}"')  # MALLORY's own gid: an operator
    try:
        jobs = {tenant: submit(node, argv=["60"], tenant=tenant) for tenant in ("alice", "bob")}
        wait_for(lambda: set(states(node).values()) == {"running"}, "the jobs never started")

        def seen(uid: int, command: str) -> set[str]:
            done = node.cli(uid, command, "--json", cwd=Path("/"))
            assert done.returncode == 0, done.stderr
            answer = json.loads(done.stdout)
            return set(answer["tenants"]) if command == "quota" else {j["tenant"] for j in answer}
        assert seen(ALICE, "quota") == {"alice"} and seen(BOB, "quota") == {"bob"}
        assert seen(ALICE, "ps") == {"alice"} and seen(BOB, "ps") == {"bob"}
        assert seen(MALLORY, "quota") == {"default", "alice", "bob"} and seen(MALLORY, "ps") == {"alice", "bob"}
        assert node.cli(MALLORY, "cancel", jobs["alice"], cwd=Path("/")).returncode != 0  # seeing is not cancelling
    finally:
        node.stop(signal.SIGKILL)
