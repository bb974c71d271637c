"""Issue 22: the node ends a job past its wall_time or its cluster lease even when its supervisor is frozen.

In a Ray task the supervisor (whose monitor owns the job's deadlines) lives in the Ray worker; a
frozen worker (SIGSTOP of a node, a partition) must not let the job run on. The fork-server, a
separate process, enforces a backstop and the lease itself. Each frozen-supervisor test runs a real
Supervisor in a subprocess, SIGSTOPs it once the job runs, and watches the job from outside: its
processes are the fork-server's descendants. Every test resumes and ends what it started.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from sandbox import JobSpec, Limits, Verdict
from sandbox.job import forkserver
from sandbox.job.backstop import BACKSTOP_SLACK
from sandbox.watch.monitor import JobControl

from .conftest import ROOT, alive, assert_no_survivors, kernel

# Runs one job in a Supervisor of its own; prints "running <fork-server pid>" at the job's first
# sample, then the verdict as JSON. argv: state dir, audit log, kernel, wall_time, mode
# ("plain"; "lease": a lease of 2 s set before the job starts; "renew": a lease of 1.5 s renewed
# every 0.3 s for 20 s), variant ("default"; "fallback": no cgroup, no namespaces).
SCRIPT = '''
import json, sys, threading, time
from sandbox import JobSpec, Limits, Supervisor
from sandbox.core.limits import Policy, Settings
from sandbox.watch.monitor import JobControl
state, audit, kernel, wall, mode, variant = sys.argv[1:7]
fallback = {"cgroups": "off", "isolation": "off", "allow_root": True} if variant == "fallback" else {}
control = JobControl()
if mode == "lease":
    control.lease_until(time.monotonic() + 2.0)
if mode == "renew":
    def renew():
        for _ in range(int(20 / 0.3)):
            control.lease_until(time.monotonic() + 1.5)
            time.sleep(0.3)
    control.lease_until(time.monotonic() + 1.5)
    threading.Thread(target=renew, daemon=True).start()
told = []
with Supervisor(Policy(settings=Settings(state_dir=state, **fallback)), launcher="forkserver", audit_log=audit) as sup:
    def on_sample(sample):
        if not told:
            told.append(1)
            print("running", sup.launcher.server_pid, flush=True)
    result = sup.run(JobSpec(kernel=kernel, limits=Limits(wall_time=float(wall), grace=1.0)), on_sample,
                     control)
print(json.dumps({"verdict": result.verdict.value, "reason": result.reason, "job_id": result.job_id,
                  "wall": result.usage.wall_seconds}), flush=True)
'''


class Frozen:
    """A supervisor subprocess running one job; `freeze()` SIGSTOPs it once the job runs."""

    def __init__(self, tmp_path: Path, state_dir: Path, name: str, wall: float, mode: str,
                 variant: str = "default") -> None:
        script = tmp_path / "supervise.py"
        script.write_text(SCRIPT)
        self.audit = tmp_path / "audit.jsonl"
        self.proc = subprocess.Popen([sys.executable, str(script), str(state_dir), str(self.audit), kernel(name),
                                      str(wall), mode, variant], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.started = time.monotonic()
        line: list[str] = []
        for text in self.proc.stdout:
            line = text.split()
            if line[:1] == ["running"]:
                break
        assert line[:1] == ["running"], f"the supervisor did not start the job: {line}"
        self.server = psutil.Process(int(line[1]))

    def job(self) -> list[psutil.Process]:
        """The job's live processes: the fork-server's descendants."""
        try:
            return [p for p in self.server.children(recursive=True) if alive(p)]
        except psutil.Error:
            return []

    def freeze(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def wait_gone(self, within: float) -> float:
        """Seconds since the job started when its last process was gone; fails past `within`."""
        deadline = self.started + within
        while self.job() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.job(), f"the job still runs {within:g} s after it started, its supervisor frozen"
        return time.monotonic() - self.started

    def enforced(self) -> list[dict]:
        lines = self.audit.read_text().splitlines() if self.audit.exists() else []
        return [r for r in map(json.loads, lines) if r.get("type") == "enforced"]

    def verdict(self) -> dict:
        self.proc.send_signal(signal.SIGCONT)
        out, _ = self.proc.communicate(timeout=60)
        return json.loads(out.strip().splitlines()[-1])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()  # its fork-server sees the control socket close and kills the job
            self.proc.wait()


@pytest.fixture
def frozen(tmp_path, state_dir):
    made: list[Frozen] = []

    def start(name: str, wall: float, mode: str = "plain", variant: str = "default") -> Frozen:
        made.append(Frozen(tmp_path, state_dir, name, wall, mode, variant))
        return made[-1]
    yield start
    for f in made:
        f.close()


@pytest.mark.parametrize("variant", ["default", pytest.param("fallback", marks=pytest.mark.slow)])
def test_wall_time_backstop_kills_the_job_of_a_frozen_supervisor(frozen, variant):
    """wall_time 2 s, grace 1 s: the fork-server kills the job (and every process it forked, one in a
    session of its own) at 2 + 1 + BACKSTOP_SLACK s, records it, and the supervisor, resumed, says
    so. `fallback`: no namespace init, no cgroup to kill the job with, only its tree and group."""
    f = frozen("spawner.py", 2.0, variant=variant)
    f.freeze()
    backstop = 2.0 + 1.0 + BACKSTOP_SLACK
    time.sleep(max(0.0, 2.0 + 1.0 + 1.0 - (time.monotonic() - f.started)))
    assert f.job(), "the job should still run: the backstop comes later than the supervisor's own end"
    gone = f.wait_gone(backstop + 4)
    assert gone >= backstop - 0.5
    records = f.enforced()
    assert len(records) == 1 and records[0]["by"] == "fork-server" and "wall_time" in records[0]["reason"]
    result = f.verdict()
    assert result["verdict"] == "wall_time", result
    assert records[0]["job_id"] == result["job_id"]
    assert "fork-server" in result["reason"] and "supervisor did not" in result["reason"], result


def test_unrenewed_lease_kills_the_job_of_a_frozen_supervisor(frozen):
    """A lease of 2 s set before the job started and never renewed: the fork-server ends the job at
    its end + grace (1 s) + BACKSTOP_SLACK although wall_time is far away, and the verdict is
    `crashed`, naming the lease."""
    f = frozen("sleeper.py", 600.0, "lease")
    f.freeze()
    kill_at = 2.0 + 1.0 + BACKSTOP_SLACK
    time.sleep(max(0.0, 2.0 + 1.0 + 1.0 - (time.monotonic() - f.started)))
    assert f.job(), "the job should still run: the fork-server leaves its supervisor time to end it"
    assert f.wait_gone(kill_at + 4) >= kill_at - 1.0
    records = f.enforced()
    assert len(records) == 1 and records[0]["by"] == "fork-server" and "lease" in records[0]["reason"]
    result = f.verdict()
    assert result["verdict"] == "crashed" and "lease lapsed" in result["reason"], result
    assert "not renewed for" in result["reason"] and "fork-server" in result["reason"], result


@pytest.mark.slow
def test_renewed_lease_reaches_the_fork_server(frozen):
    """A lease of 1.5 s renewed every 0.3 s: the job outlives the first deadline and its backstop
    (the fork-server got each renewal); frozen, the renewals stop and the fork-server ends it 1.5 s
    + grace + BACKSTOP_SLACK after the last one."""
    f = frozen("sleeper.py", 600.0, "renew")
    first = 1.5 + 1.0 + BACKSTOP_SLACK
    time.sleep(max(0.0, first + 1.0 - (time.monotonic() - f.started)))
    assert f.job(), "a renewed lease must keep the job alive"
    f.freeze()
    frozen_at = time.monotonic() - f.started
    gone = f.wait_gone(frozen_at + first + 4)
    assert gone > first + 1.0
    assert [r["reason"] for r in f.enforced()] and "lease" in f.enforced()[0]["reason"]
    assert f.verdict()["verdict"] == "crashed"


# --- the supervisor side (JobControl), not frozen --------------------------------------------------

def _run_in_thread(sup, spec, control):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", sup.run(spec, control=control)))
    thread.start()
    return thread, out


def test_supervisor_ends_the_job_when_its_lease_lapses(any_supervisor):
    """Both launchers: the supervisor itself ends the job gracefully at its lease's end."""
    control = JobControl()
    control.lease_until(time.monotonic() + 1.0)
    started = time.monotonic()
    r = any_supervisor.run(JobSpec(kernel=kernel("sleeper.py"), limits=Limits(wall_time=60, grace=1)), control=control)
    assert r.verdict is Verdict.crashed and r.reason.startswith("its cluster lease lapsed (not renewed for"), r.reason
    assert "the node ended the job" in r.reason
    assert time.monotonic() - started < 1.0 + 1.0 + 4
    assert r.termination is not None and r.termination.sigterm_at is not None


def test_renewed_lease_keeps_the_job(supervisor):
    control = JobControl()
    stop = threading.Event()

    def renew():
        while not stop.is_set():
            control.lease_until(time.monotonic() + 0.8)
            stop.wait(0.2)
    control.lease_until(time.monotonic() + 0.8)  # before the job starts: applied at its launch
    keeper = threading.Thread(target=renew)
    keeper.start()
    thread, out = _run_in_thread(supervisor, JobSpec(kernel=kernel("sleeper.py"), limits=Limits(wall_time=60)),
                                 control)
    try:
        time.sleep(3.0)
        assert thread.is_alive(), out.get("r")
        control.lease_until(None)  # cleared: no lease deadline at all any more
        stop.set()
        keeper.join()
        time.sleep(1.5)
        assert thread.is_alive(), out.get("r")
    finally:
        stop.set()
        control.cancel("test over")
        thread.join(30)
    assert out["r"].verdict is Verdict.cancelled, out["r"].reason


def test_lease_lost_ends_the_job_at_once(supervisor):
    control = JobControl()
    thread, out = _run_in_thread(supervisor, JobSpec(kernel=kernel("sleeper.py"), limits=Limits(wall_time=60)),
                                 control)
    time.sleep(1.0)
    control.lease_lost("the cluster authority revoked its lease")
    thread.join(30)
    r = out["r"]
    assert r.verdict is Verdict.crashed and r.reason == "the cluster authority revoked its lease", r.reason
    control.lease_until(time.monotonic() + 5)  # after the end: ignored, never raises


# --- the fork-server's control messages ------------------------------------------------------------

def _started(sup, job_id: str) -> int:
    """The pid of a job's first process, from its `started` audit record."""
    for _ in range(200):
        for line in sup.audit.path.read_text().splitlines() if sup.audit.path.exists() else []:
            record = json.loads(line)
            if record.get("type") == "started" and record.get("job_id") == job_id:
                return record["pid"]
        time.sleep(0.05)
    raise AssertionError(f"no started record for {job_id}")


def test_stray_and_garbage_messages_kill_nothing(supervisor):
    """A lease for a job that ended, for another job's pid, and malformed messages of every kind:
    the fork-server ignores them; the running job lives and the server still starts jobs."""
    done = supervisor.run(JobSpec(kernel=kernel("tiny.py")))
    ended_pid = _started(supervisor, done.job_id)
    control = JobControl()
    spec = JobSpec(kernel=kernel("sleeper.py"), limits=Limits(wall_time=60))
    thread, out = _run_in_thread(supervisor, spec, control)
    try:
        pid = _started(supervisor, spec.job_id)
        now = time.monotonic()
        launcher = supervisor.launcher
        launcher.lease(done.job_id, ended_pid, now - 10)  # a job that ended
        launcher.lease(done.job_id, pid, now - 10)  # the running job's pid, another job's id
        launcher.lease(spec.job_id, pid + 1, now - 10)
        garbage = [forkserver.HEADER.pack(forkserver.LEASE, 9) + b"not json!",
                   forkserver.HEADER.pack(forkserver.LEASE, 2) + b"[]",
                   *(forkserver.HEADER.pack(forkserver.LEASE, len(p)) + p for p in (
                       json.dumps({"job_id": spec.job_id, "pid": pid, "deadline": "soon"}).encode(),
                       json.dumps({"job_id": spec.job_id, "pid": str(pid), "deadline": now - 10}).encode(),
                       b'{"job_id": "%s", "pid": %d, "deadline": NaN}' % (spec.job_id.encode(), pid),
                       b'{"job_id": "%s", "pid": %d, "deadline": -Infinity}' % (spec.job_id.encode(), pid))),
                   forkserver.HEADER.pack(b"?", 4) + b"junk"]
        with launcher._lock:
            for message in garbage:
                launcher._control.sendall(message)
        time.sleep(1.5)
        assert thread.is_alive() and alive(pid), out.get("r")
        assert supervisor.run(JobSpec(kernel=kernel("tiny.py"))).verdict is Verdict.ok
        assert alive(pid)
    finally:
        control.cancel("test over")
        thread.join(30)
    assert out["r"].verdict is Verdict.cancelled, out["r"].reason


def test_fork_server_kills_exactly_the_job_whose_lease_passed(supervisor):
    """Two jobs of one fork-server; a lease deadline already past for one of them: the fork-server
    kills that one at once (verdict `crashed`, an `enforced` record), and the other runs on."""
    jobs = [(JobSpec(kernel=kernel("spawner.py"), limits=Limits(wall_time=60)), JobControl()) for _ in range(2)]
    runs = [_run_in_thread(supervisor, spec, control) for spec, control in jobs]
    (first, _), (second, second_control) = jobs
    try:
        pids = [_started(supervisor, spec.job_id) for spec, _ in jobs]
        time.sleep(1.0)  # every process of both spawned
        supervisor.launcher.lease(first.job_id, pids[0], time.monotonic() - 1)
        runs[0][0].join(10)
        assert not runs[0][0].is_alive(), "the fork-server did not kill the job whose lease passed"
        r = runs[0][1]["r"]
        assert r.verdict is Verdict.crashed and "fork-server ended the job" in r.reason, r.reason
        assert alive(pids[1]) and runs[1][0].is_alive()
        records = [json.loads(line) for line in supervisor.audit.path.read_text().splitlines()]
        assert [rec["job_id"] for rec in records if rec.get("type") == "enforced"][-1:] == [first.job_id]
        assert not any(rec.get("type") == "enforced" and rec["job_id"] == second.job_id for rec in records)
    finally:
        for _, control in jobs:
            control.cancel("test over")
        for thread, _ in runs:
            thread.join(30)
    assert runs[1][1]["r"].verdict is Verdict.cancelled, runs[1][1]["r"].reason
    assert_no_survivors(supervisor, first.job_id)
