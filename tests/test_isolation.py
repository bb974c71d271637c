"""Jobs in their own namespaces: what a job can see, name, signal and reach, attacked for real.

Each job below tries what an adversarial job tried on the code before namespaces: list the host's
processes, signal the supervisor, read the supervisor's environment, reach a service on the host's
loopback (where Ray's GCS and raylet listen). They run under the default supervisor (namespaces
where this machine allows them; skipped with the reason elsewhere) and, as the control that shows
the attack is real, under a supervisor with `isolation = "off"`.
"""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

from sandbox import JobSpec, Limits, Supervisor, Verdict
from sandbox.namespaces import probe

from .conftest import assert_no_survivors, kernel, make_policy

NO_NAMESPACES = probe()
pytestmark = pytest.mark.skipif(NO_NAMESPACES is not None, reason=f"no namespaces here: {NO_NAMESPACES}")

LOOK_AROUND = """
import json, os, socket, sys
supervisor, port = int(sys.argv[1]), int(sys.argv[2])
seen = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
try:
    os.kill(supervisor, 0)
    signal = "delivered"
except OSError as err:
    signal = type(err).__name__
try:
    environ = open(f"/proc/{supervisor}/environ", "rb").read().decode(errors="replace")
except OSError as err:
    environ = type(err).__name__
try:
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    connect = "connected"
except OSError as err:
    connect = type(err).__name__
print(json.dumps({"me": os.getpid(), "parent": os.getppid(), "seen": seen, "signal": signal,
                  "environ": environ[:200], "connect": connect, "hostname": socket.gethostname()}))
"""


@pytest.fixture
def host_service():
    """A TCP listener on the host's loopback, like Ray's GCS."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except OSError:
                continue
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def _look(sup: Supervisor, tmp_path, port: int, **limits) -> dict:
    script = tmp_path / "look.py"
    script.write_text(LOOK_AROUND)
    r = sup.run(JobSpec(kernel=str(script), argv=[str(os.getpid()), str(port)], limits=Limits(**limits)))
    assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)
    assert_no_survivors(sup, r.job_id)
    return json.loads(r.stdout_tail)


def test_without_namespaces_the_job_sees_signals_and_reaches_everything(state_dir, tmp_path, host_service):
    with Supervisor(make_policy(state_dir, isolation="off"), audit_log=state_dir / "audit-shared.jsonl") as sup:
        seen = _look(sup, tmp_path, host_service)
    assert os.getpid() in seen["seen"] and seen["signal"] == "delivered" and seen["connect"] == "connected"
    assert "=" in seen["environ"]  # it read the supervisor's environment


def test_in_its_namespaces_the_job_sees_only_itself_and_reaches_nothing(supervisor, tmp_path, host_service):
    seen = _look(supervisor, tmp_path, host_service)
    assert (seen["me"], seen["parent"], seen["seen"]) == (2, 1, [1, 2])  # under the sandbox's init
    assert seen["signal"] == "ProcessLookupError"  # the supervisor cannot even be named
    assert seen["environ"] in ("FileNotFoundError", "ProcessLookupError")
    assert seen["connect"] in ("ConnectionRefusedError", "OSError")  # its loopback is not the host's
    assert seen["hostname"] == "taichi-sandbox"


def test_network_host_reaches_the_hosts_loopback(supervisor, tmp_path, host_service):
    seen = _look(supervisor, tmp_path, host_service, network="host")
    assert seen["connect"] == "connected" and seen["seen"] == [1, 2]


def test_enforcement_reports_namespaces_and_the_missing_uid_boundary(supervisor, state_dir):
    r = supervisor.run(JobSpec(kernel=kernel("tiny.py")))
    assert r.enforcement["namespaces"].level == "hard" and "net (none" in r.enforcement["namespaces"].by
    assert r.enforcement["tenant_isolation"].level == "unavailable"
    assert "share the supervisor's uid" in r.enforcement["tenant_isolation"].note
    with Supervisor(make_policy(state_dir, isolation="off"), audit_log=state_dir / "audit-shared.jsonl") as sup:
        off = sup.run(JobSpec(kernel=kernel("tiny.py")))
    assert off.enforcement["namespaces"].level == "unavailable" and 'isolation = "off"' in off.enforcement[
        "namespaces"].note


def test_required_isolation_rejects_jobs_where_namespaces_are_unavailable(state_dir, monkeypatch):
    with Supervisor(make_policy(state_dir, isolation="required"), audit_log=state_dir / "audit-req.jsonl") as sup:
        monkeypatch.setattr(sup, "namespaces_unavailable", lambda: "cannot create namespaces here (EPERM)")
        r = sup.run(JobSpec(kernel=kernel("tiny.py")))
    assert r.verdict is Verdict.rejected and "isolation is required" in r.reason and "EPERM" in r.reason
