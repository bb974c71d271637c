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
import sys
import threading
from pathlib import Path

import pytest

from sandbox import JobSpec, Limits, Supervisor, Verdict
from sandbox.job.namespaces import probe

from .conftest import ROOT, assert_no_survivors, kernel, make_policy

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
    with Supervisor(make_policy(state_dir, isolation="off", allow_root=True),
                    audit_log=state_dir / "audit-shared.jsonl") as sup:
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


def test_enforcement_reports_namespaces_and_the_uid(supervisor, state_dir):
    r = supervisor.run(JobSpec(kernel=kernel("tiny.py")))
    assert r.enforcement["namespaces"].level == "hard" and "net (none" in r.enforcement["namespaces"].by
    uid = r.enforcement["tenant_isolation"]
    if os.geteuid() == 0:
        assert uid.level == "hard" and uid.by.startswith("uid 6")
    else:
        assert uid.level == "unavailable" and "not root" in uid.note
    with Supervisor(make_policy(state_dir, isolation="off", allow_root=True),
                    audit_log=state_dir / "audit-shared.jsonl") as sup:
        off = sup.run(JobSpec(kernel=kernel("tiny.py")))
    assert off.enforcement["namespaces"].level == "unavailable" and 'isolation = "off"' in off.enforcement[
        "namespaces"].note


def test_required_isolation_rejects_jobs_where_namespaces_are_unavailable(state_dir, monkeypatch):
    with Supervisor(make_policy(state_dir, isolation="required"), audit_log=state_dir / "audit-req.jsonl") as sup:
        monkeypatch.setattr(sup, "namespaces_unavailable", lambda: "cannot create namespaces here (EPERM)")
        r = sup.run(JobSpec(kernel=kernel("tiny.py")))
    assert r.verdict is Verdict.rejected and "isolation is required" in r.reason and "EPERM" in r.reason


WHO_AM_I = """
import json, os, sys
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
try:
    open(sys.argv[1]).read()
    secret = "read"
except OSError as err:
    secret = type(err).__name__
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(), "secret": secret,
                  "caps": status["CapEff"].strip(), "bounding": status["CapBnd"].strip(),
                  "no_new_privs": status["NoNewPrivs"].strip()}))
"""

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="jobs switch to a tenant's uid only under a root supervisor")


def _tenants(state_dir, **settings) -> Supervisor:
    from sandbox import Policy
    from sandbox.core.limits import Settings, Tenant
    policy = Policy(tenants={"alice": Tenant(), "bob": Tenant(), "nob": Tenant(run_as="nobody")},
                    settings=Settings(state_dir=str(state_dir), **settings))
    return Supervisor(policy, audit_log=state_dir / "audit-tenants.jsonl")


@root_only
def test_each_tenant_runs_as_its_own_uid_without_groups_capabilities_or_root_files(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    script = tmp_path / "who.py"
    script.write_text(WHO_AM_I)
    with _tenants(tmp_path / "state") as sup:
        seen = {}
        for tenant in ("alice", "bob", "nob"):
            r = sup.run(JobSpec(kernel=str(script), argv=[str(secret)], tenant=tenant))
            assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)
            assert r.enforcement["tenant_isolation"].level == "hard"
            seen[tenant] = json.loads(r.stdout_tail)
    uids = json.loads((tmp_path / "state" / "uids.json").read_text())
    assert {seen[t]["uid"] for t in ("alice", "bob")} == {uids["alice"], uids["bob"]} and len(set(uids.values())) == 2
    assert seen["nob"]["uid"] == 65534  # run_as = "nobody"
    for who in seen.values():
        assert who["uid"] == who["gid"] or who["uid"] == 65534
        assert who["groups"] == [] and who["caps"] == who["bounding"] == "0000000000000000"
        assert who["no_new_privs"] == "1" and who["secret"] == "PermissionError"
    cache = tmp_path / "state" / "ticache" / "alice"  # the supervisor's; only alice's jobs may read it
    assert (cache.stat().st_uid, cache.stat().st_gid, cache.stat().st_mode & 0o777) == (0, uids["alice"], 0o750)


@root_only
def test_a_kernel_file_the_tenants_uid_cannot_read_is_rejected_with_the_reason(tmp_path):
    script = tmp_path / "private.py"
    script.write_text("print('never')\n")
    script.chmod(0o600)
    with _tenants(tmp_path / "state") as sup:
        r = sup.run(JobSpec(kernel=str(script), tenant="alice"))
    assert r.verdict is Verdict.rejected and "not readable by the job's uid" in r.reason


@root_only
def test_a_tenant_keeps_its_uid_across_supervisors(tmp_path):
    for _ in range(2):
        with _tenants(tmp_path / "state") as sup:
            r = sup.run(JobSpec(kernel=kernel("tiny.py"), tenant="bob"))
            assert r.verdict is Verdict.ok, r.reason
    assert json.loads((tmp_path / "state" / "uids.json").read_text()) == {"bob": 60000}


@root_only
def test_root_jobs_without_namespaces_are_refused_unless_allowed(tmp_path):
    script = tmp_path / "who.py"
    script.write_text(WHO_AM_I)
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    with _tenants(tmp_path / "state", isolation="off") as sup:
        refused = sup.run(JobSpec(kernel=str(script), argv=[str(secret)]))
    assert refused.verdict is Verdict.rejected and "would run as root" in refused.reason
    with _tenants(tmp_path / "state", isolation="off", allow_root=True) as sup:
        allowed = sup.run(JobSpec(kernel=str(script), argv=[str(secret)]))
    seen = json.loads(allowed.stdout_tail)  # the control: as root the job reads what a tenant's uid cannot
    assert allowed.verdict is Verdict.ok and seen["uid"] == 0 and seen["secret"] == "read"
    assert any("WARNING: the job runs as root" in n for n in allowed.notes)
    assert allowed.enforcement["tenant_isolation"].level == "unavailable"


# --- A supervisor that is not root: namespaces inside a user namespace ---------------------------

AS_UID = """
import os, sys
from sandbox.job import mounts, namespaces
uid, code = int(sys.argv[1]), sys.argv[2]
namespaces.unshare(namespaces.CLONE_NEWNS)  # only to reach the interpreter under a 0700 /root
mounts.mount(None, "/", None, mounts.MS_REC | mounts.MS_PRIVATE)
mounts.expose_paths([(p, False) for p in mounts.interpreter_paths()], uid, uid)
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
os.environ.setdefault("TAICHI_SANDBOX_WARM", "0")  # a CLI run here leaves no warm server of this uid behind
os.execv(sys.executable, [sys.executable, "-c", code, *sys.argv[3:]])
"""

NOT_ROOT_SUPERVISOR = """
import json, os, sys
from sandbox import JobSpec, Policy, Supervisor
from sandbox.core.limits import Settings
with Supervisor(Policy(settings=Settings(state_dir=sys.argv[1], isolation=sys.argv[2]))) as sup:
    r = sup.run(JobSpec(kernel=sys.argv[3], argv=[str(os.getpid())]))
print(json.dumps({"verdict": r.verdict.value, "reason": r.reason, "stdout": r.stdout_tail,
                  "stderr": r.stderr_tail[-2000:], "namespaces": r.enforcement["namespaces"].model_dump() if r.enforcement else {}}))
"""

ESCAPE = """
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
supervisor = int(sys.argv[1])
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
try:
    os.kill(supervisor, 0)
    signal = "delivered"
except OSError as err:
    signal = type(err).__name__
unmount = "unmounted" if libc.umount2(b"/tmp", 2) == 0 else os.strerror(ctypes.get_errno())  # MNT_DETACH
print(json.dumps({"uid": os.getuid(), "seen": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
                  "signal": signal, "tmp": sorted(os.listdir("/tmp")), "cwd": os.getcwd(), "unmount": unmount,
                  "caps": status["CapEff"].strip(), "no_new_privs": status["NoNewPrivs"].strip()}))
"""

OPERATOR_UID = 59999  # the unprivileged user the supervisor runs as (below the tenants' uid_range)


def _not_root_supervisor(tmp_path, isolation: str) -> dict:
    """Run a supervisor as OPERATOR_UID (a real process of that uid) on ESCAPE; its JSON report."""
    import subprocess
    home = tmp_path / "operator"
    home.mkdir()
    os.chown(home, OPERATOR_UID, OPERATOR_UID)
    script = home / "escape.py"
    script.write_text(ESCAPE)
    done = subprocess.run([sys.executable, "-c", AS_UID, str(OPERATOR_UID), NOT_ROOT_SUPERVISOR, str(home / "state"),
                           isolation, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start a supervisor as another (unprivileged) uid")
def test_a_supervisor_that_is_not_root_isolates_its_jobs_in_a_user_namespace(tmp_path):
    report = _not_root_supervisor(tmp_path, "auto")
    assert report["verdict"] == "ok", report
    seen = json.loads(report["stdout"])
    assert seen["uid"] == OPERATOR_UID and seen["seen"] == [1, 2] and seen["signal"] == "ProcessLookupError"
    # its own /tmp: only its work dir, and the interpreter and this checkout where they live under /tmp
    work = Path(seen["cwd"]).relative_to("/tmp").parts[0]
    exposed = {Path(p).resolve().relative_to("/tmp").parts[0] for p in (sys.prefix, sys.base_prefix, ROOT)
               if Path(p).resolve().is_relative_to("/tmp")}
    assert work.startswith("tsbx-") and set(seen["tmp"]) == {work, *exposed}, seen["tmp"]
    assert seen["caps"] == "0000000000000000" and seen["no_new_privs"] == "1"
    assert seen["unmount"] == "Operation not permitted"  # its private /tmp stays
    assert report["namespaces"]["level"] == "hard" and "user (" in report["namespaces"]["by"]


WRITE_AROUND = """
import json, os, sys
found = {}
for path in sys.argv[1:]:
    try:
        with open(path, "w") as f:
            f.write("left behind")
        found[path] = "written"
    except OSError as err:
        found[path] = err.strerror
print(json.dumps(found))
"""


@pytest.mark.parametrize("rootfs", ["read-only", "writable"])
def test_outside_its_own_directories_the_job_writes_nothing_unless_rootfs_is_writable(tmp_path, rootfs):
    drop = tmp_path / "world-writable"  # like /dev/mqueue, or a shared scratch directory
    drop.mkdir(mode=0o777)
    drop.chmod(0o777)
    script = tmp_path / "write.py"
    script.write_text(WRITE_AROUND)
    with _tenants(tmp_path / "state", rootfs=rootfs) as sup:
        r = sup.run(JobSpec(kernel=str(script), argv=[str(drop / "x"), "/tmp/x", "x", "/dev/shm/x", "/dev/null"]))
    assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)
    found = json.loads(r.stdout_tail)
    assert found.pop(str(drop / "x")) == ("Read-only file system" if rootfs == "read-only" else "written")
    assert found == {p: "written" for p in ("/tmp/x", "x", "/dev/shm/x", "/dev/null")}  # its own, and devices
    assert ("read-only" in r.enforcement["namespaces"].by) is (rootfs == "read-only")
