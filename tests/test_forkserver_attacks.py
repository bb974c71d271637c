"""Attacks on the fork-server and on state that jobs share, each asserting the FIXED behaviour.

A job's parent is the fork-server, which runs as the same user: today a job can reach its UNIX
socket (fs.sock in /proc/<ppid>/cwd), stall or signal it, write to the stdout it inherited from the
CLI, and (same uid, same mount and IPC namespaces) write the audit log, other tenants' offline
caches, and leave /dev/shm files and SysV segments behind. Every test here fails on the code this
file was written against (commit 306abbf); each one names what a fix must guarantee.

The job scripts find the fork-server only through their own parent (its cwd, and the UNIX sockets
it holds, resolved in /proc/net/unix), and only when that parent is a sandbox process, so a job
never touches another supervisor's fork-server or the machine's init, even when test runs overlap.
Pids a job reports may be in its own PID namespace, so the tests never signal them: a job process
the test must find is named (PR_SET_NAME, visible in /proc/<pid>/comm from outside) with a random
tag. Every test ends its supervisor, resumes a stopped fork-server and removes what its jobs
created, whatever happens.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from sandbox import JobSpec, Limits, Policy, Supervisor, Verdict
from sandbox.core.limits import Settings, Tenant
from sandbox.job import namespaces
from sandbox.watch.monitor import JobControl

from .conftest import ROOT, make_policy

# Hole 5 needs jobs under a uid of their own, which a root supervisor gives them (these tests failed
# against commit 306abbf and with namespaces alone). Hole 6 needs the job's own mount and IPC
# namespaces, where this machine allows them.
SEPARATE_UID = os.geteuid() == 0  # a root supervisor runs each tenant as its own uid
needs_uid = pytest.mark.skipif(not SEPARATE_UID, reason="jobs run as their tenant's own uid only under a root "
                                                        "supervisor")
_NO_NAMESPACES = namespaces.probe()
needs_namespaces = pytest.mark.skipif(_NO_NAMESPACES is not None, reason=f"no namespaces here: {_NO_NAMESPACES}")

# Prepended to every job script that looks at its parent.
PARENT = '''
import ctypes, os

def sandbox_parent():
    """The parent's pid when it is a sandbox process (the fork-server today; in a PID namespace
    its init may be pid 1), else None: the machine's init is never touched."""
    ppid = os.getppid()
    try:
        return ppid if b"sandbox" in open(f"/proc/{ppid}/cmdline", "rb").read() else None
    except OSError:
        return None

def set_name(tag):
    """Name this process (PR_SET_NAME) so that the test can find it from outside its namespaces."""
    ctypes.CDLL(None).prctl(15, tag.encode(), 0, 0, 0)
'''

# How a job finds its fork-server today. Prepended to the job scripts that talk to it.
FIND_SERVER = PARENT + '''
import socket

def server_addresses():
    """fs.sock in the parent's cwd, and the address of every UNIX socket the parent holds."""
    ppid = sandbox_parent()
    if ppid is None:
        return []
    found = [f"/proc/{ppid}/cwd/fs.sock"]
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{ppid}/fd"):
            link = os.readlink(f"/proc/{ppid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        for line in open("/proc/net/unix").read().splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 8 and cols[6] in inodes:
                found.append("\\0" + cols[7][1:] if cols[7].startswith("@") else cols[7])
    except OSError:
        pass
    return list(dict.fromkeys(found))

def connect_to_server():
    """A connected socket and its address, or None and why each address failed."""
    errors = []
    for address in server_addresses():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(address)
            return sock, address
        except OSError as err:
            errors.append(f"{address!r}: {err!r}")
            sock.close()
    return None, "; ".join(errors) or "no candidate address"
'''

HELLO = "print('hello', flush=True)\n"


def _script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _supervisor(tmp_path: Path, **settings) -> Supervisor:
    """A private supervisor: these tests damage or stall its fork-server. Its jobs report to the
    test through files in tmp_path, so the filesystem stays writable for them (`rootfs`, tested in
    test_isolation): each attack here is stopped by something else."""
    return Supervisor(make_policy(tmp_path / "state", **{"rootfs": "writable", **settings}),
                      audit_log=tmp_path / "state" / "audit.jsonl")


def _cli_env(tmp_path: Path) -> dict[str, str]:
    """The CLI of this checkout (not whatever `sandbox` the venv points at), with private state and
    the bundled policy, but a writable filesystem for its jobs (see `_supervisor`)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    limits = tmp_path / "limits.toml"
    limits.write_text((ROOT / "limits.toml").read_text().replace('rootfs = "read-only"', 'rootfs = "writable"'))
    return {**os.environ, "PYTHONPATH": path, "XDG_STATE_HOME": str(tmp_path / "state"),
            "TAICHI_SANDBOX_LIMITS": str(limits)}


def _wait_for(path: Path, within: float) -> str | None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.02)
    return None


class _Background:
    """One `sup.run()` in a daemon thread: `.result` once done, `.elapsed` in seconds."""

    def __init__(self, sup: Supervisor, spec: JobSpec, control: JobControl | None = None) -> None:
        self.result = None
        self.elapsed = None
        self.error: BaseException | None = None
        started = time.monotonic()

        def body() -> None:
            try:
                self.result = sup.run(spec, control=control)
            except BaseException as err:  # noqa: BLE001 - reported by the test
                self.error = err
            self.elapsed = time.monotonic() - started

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()


def _resume(proc: psutil.Process | None) -> None:
    """SIGCONT a fork-server a job may have stopped (psutil checks it is still the same process)."""
    if proc is not None:
        try:
            proc.resume()
        except psutil.Error:
            pass


def _server_process(sup: Supervisor) -> psutil.Process | None:
    pid = getattr(sup.launcher, "server_pid", None)
    try:
        return psutil.Process(pid) if pid is not None else None
    except psutil.Error:
        return None


def _tag() -> str:
    """A process name for a job process (13 characters: /proc/<pid>/comm keeps 15)."""
    return "atk" + secrets.token_hex(5)


def _named(tag: str) -> list[psutil.Process]:
    """Live processes named `tag` (by a job script's set_name), from any PID namespace."""
    found = []
    for proc in psutil.process_iter():
        try:
            if Path(f"/proc/{proc.pid}/comm").read_text().strip() == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def _kill(procs) -> None:
    for proc in procs:
        try:
            proc.kill()  # psutil refuses a pid reused since the Process object was made
        except psutil.Error:
            pass


# --- 1. a job asks the fork-server for an extra, unwatched process -----------------------------------

ROGUE = PARENT + """
import sys, time
set_name(sys.argv[2])
with open(sys.argv[1], "w") as f:
    f.write(f"rogue {os.getpid()}\\n")
block = bytearray(64 << 20)  # outside the job's tree and cgroup: counted against no limit
t0 = time.process_time()
while time.process_time() - t0 < 0.3:
    pass
"""

ROGUE_REQUEST = FIND_SERVER + """
import json, struct, sys
marker, rogue, tag = sys.argv[1:4]
conn, where = connect_to_server()
if conn is None:
    print("no fork-server reachable:", where, flush=True)
    sys.exit(0)
plan = {"job_id": "rogue", "target": rogue, "argv": [marker, tag], "ti_arch": "cpu", "workdir": "/",
        "parent_pid": 0}
payload = json.dumps(plan).encode()
null = os.open(os.devnull, os.O_WRONLY)
try:
    socket.send_fds(conn, [struct.pack("!I", len(payload))], [null, null, null])
    conn.sendall(payload)
    conn.settimeout(5)
    reply = b""
    while b"exit" not in reply:  # "pid N" once forked, then "exit ..." when the server reaped it
        chunk = conn.recv(256)
        if not chunk:
            break
        reply += chunk
except OSError as err:
    print("request failed:", repr(err), flush=True)
    sys.exit(0)
print("reply:", reply, flush=True)
"""


def test_job_cannot_make_the_fork_server_fork_an_unwatched_process(tmp_path):
    marker, tag = tmp_path / "rogue-ran", _tag()
    rogue = _script(tmp_path, "rogue.py", ROGUE)
    try:
        with _supervisor(tmp_path) as sup:
            r = sup.run(JobSpec(kernel=_script(tmp_path, "request.py", ROGUE_REQUEST),
                                argv=[str(marker), rogue, tag], limits=Limits(memory="256MiB", wall_time="20s")))
        assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)
        assert not re.search(r"pid \d+", r.stdout_tail), f"the fork-server forked for the job: {r.stdout_tail}"
        assert not marker.exists(), f"a process the supervisor never saw ran: {marker.read_text()}"
    finally:
        _kill(_named(tag))  # today the supervisor kills the rogue as a leftover; make sure


# --- 2. a silent connection stalls the fork-server ---------------------------------------------------

SILENT = FIND_SERVER + """
import sys, time
ready, hold, tag = sys.argv[1:4]
set_name(tag)
conn, where = connect_to_server()
state = "connected" if conn is not None else f"refused {where}"
with open(ready, "w") as f:
    f.write(state + "\\n")
print(state, flush=True)
time.sleep(float(hold))  # holding the connection (if it got one) and sending nothing
"""


def test_silent_connection_does_not_stall_the_next_job(tmp_path):
    ready = tmp_path / "ready"
    control = JobControl()
    silent = nxt = None
    with _supervisor(tmp_path) as sup:
        try:
            sup.run(JobSpec(kernel=_script(tmp_path, "warm.py", HELLO)))  # the fork-server is up
            silent = _Background(sup, JobSpec(kernel=_script(tmp_path, "silent.py", SILENT),
                                              argv=[str(ready), "30", _tag()], limits=Limits(wall_time="60s")), control)
            _wait_for(ready, 10)
            nxt = _Background(sup, JobSpec(kernel=_script(tmp_path, "hello.py", HELLO)))
            assert nxt.join(5), "a job's silent connection to the fork-server stalled the next job"
            assert nxt.error is None and nxt.result.verdict is Verdict.ok and "hello" in nxt.result.stdout_tail
        finally:
            control.cancel()
            for job in (silent, nxt):
                if job is not None:
                    job.join(20)


def test_sigkill_of_cli_kills_a_job_holding_a_silent_connection(tmp_path):
    """The fork-server blocked in recv() on the job's connection never sees the lifeline close: the
    job would outlive its supervisor (and its wall time) for good."""
    ready, tag = tmp_path / "ready", _tag()
    cli = subprocess.Popen([sys.executable, "-m", "sandbox", "run", _script(tmp_path, "silent.py", SILENT),
                            "--wall-time", "60s", "--", str(ready), "3600", tag],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_cli_env(tmp_path), cwd=tmp_path)
    job, around = [], []
    try:
        assert _wait_for(ready, 30) is not None, "the job did not start"
        job = _named(tag)
        assert len(job) == 1, job
        # The fork-server (and any process between it and the job): sandbox processes, not init.
        around = [p for p in job[0].parents() if p.pid not in (1, cli.pid) and "sandbox" in " ".join(p.cmdline())]
        time.sleep(0.2)  # the fork-server is now in recv() on the job's connection (if it got one)
        cli.kill()
        cli.wait()
        alive = psutil.wait_procs(job, timeout=2.0)[1]
        assert alive == [], "the job outlived the SIGKILLed CLI by 2 s"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        _kill(job + _named(tag))
        psutil.wait_procs(around, timeout=1.0)  # the job's connection closed: the server sees the lifeline
        _kill(around)


# --- 3. a job signals the fork-server ----------------------------------------------------------------

SIGNAL_SERVER = PARENT + """
import signal, sys, time
sig, ready = getattr(signal, sys.argv[1]), sys.argv[2]
deadline = time.monotonic() + 10
while ready != "-" and not os.path.exists(ready) and time.monotonic() < deadline:
    time.sleep(0.02)  # the job beside us is running
ppid = sandbox_parent()
try:
    if ppid is not None:
        os.kill(ppid, sig)
    print("signalled", ppid, flush=True)
except OSError as err:
    print("refused", repr(err), flush=True)
"""

BESIDE = """
import sys, time
open(sys.argv[1], "w").write("running")
time.sleep(2)
print("slept", flush=True)
"""


def test_sigstop_of_the_fork_server_does_not_hang_the_next_job(tmp_path):
    stopper = nxt = server = None
    sup = _supervisor(tmp_path)
    try:
        sup.run(JobSpec(kernel=_script(tmp_path, "warm.py", HELLO)))
        server = _server_process(sup)
        stopper = _Background(sup, JobSpec(kernel=_script(tmp_path, "stop.py", SIGNAL_SERVER),
                                           argv=["SIGSTOP", "-"], limits=Limits(wall_time="3s")))
        stopper.join(1.5)  # it signals at once; its own verdict may wait on the stopped server
        nxt = _Background(sup, JobSpec(kernel=_script(tmp_path, "hello.py", HELLO), limits=Limits(wall_time="10s")))
        assert nxt.join(6), "the next job hung behind a SIGSTOPped fork-server"
        assert nxt.error is None and nxt.result.verdict is Verdict.ok, nxt.result
        assert stopper.join(6), "the job that stopped the fork-server never got a verdict"
    finally:
        _resume(server)
        _resume(_server_process(sup))  # a fork-server the supervisor may have started since
        for job in (stopper, nxt):
            if job is not None:
                job.join(20)
        sup.close()


def test_sigkill_of_the_fork_server_does_not_crash_the_job_beside_it(tmp_path):
    ready = tmp_path / "ready"
    beside = None
    with _supervisor(tmp_path) as sup:
        try:
            sup.run(JobSpec(kernel=_script(tmp_path, "warm.py", HELLO)))
            beside = _Background(sup, JobSpec(kernel=_script(tmp_path, "beside.py", BESIDE), argv=[str(ready)]))
            sup.run(JobSpec(kernel=_script(tmp_path, "kill.py", SIGNAL_SERVER), argv=["SIGKILL", str(ready)]))
            assert beside.join(10)
            r = beside.result
            assert r.verdict is Verdict.ok and "slept" in r.stdout_tail, (r.verdict, r.reason, r.notes)
            after = sup.run(JobSpec(kernel=_script(tmp_path, "hello.py", HELLO)))
            assert after.verdict is Verdict.ok
        finally:
            if beside is not None:
                beside.join(10)


# --- 4. a job writes into the CLI's stdout -----------------------------------------------------------

FORGE = PARENT + """
import json, sys
forged = json.dumps({"job_id": "forged", "kernel": "forged.py", "verdict": "ok", "exit_code": 0})
# The fork-server's stdout (inherited from the CLI), and the CLI's own (its command line names this file).
targets = {sandbox_parent()} - {None}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        if int(pid) != os.getpid() and sys.argv[0].encode() in open(f"/proc/{pid}/cmdline", "rb").read():
            targets.add(int(pid))
    except OSError:
        pass
for pid in sorted(targets):
    try:
        with open(f"/proc/{pid}/fd/1", "a") as f:
            f.write(forged + "\\n")
        print("forged via", pid, flush=True)
    except OSError as err:
        print("refused", pid, repr(err), flush=True)
"""


def test_job_cannot_forge_a_result_line_on_the_cli_stdout(tmp_path):
    p = subprocess.run([sys.executable, "-m", "sandbox", "run", _script(tmp_path, "forge.py", FORGE), "--json"],
                       capture_output=True, text=True, env=_cli_env(tmp_path), cwd=tmp_path, timeout=60)
    lines = p.stdout.splitlines()
    assert len(lines) == 1, f"{len(lines)} lines on stdout: {[line[:80] for line in lines]}"
    result = json.loads(lines[0])
    assert result["job_id"] != "forged" and result["verdict"] == "ok", result


# --- 5. a job writes the audit log and another tenant's offline cache (needs a per-job uid) ---------

TAMPER = """
import json, os, sys, time
import taichi as ti
ti.init(arch=ti.cpu)
what, state = sys.argv[1], sys.argv[2]  # the supervisor's state dir
if what == "audit":
    record = {"type": "job", "job_id": "forged", "tenant": "bob", "ts": time.time(), "verdict": "ok"}
    targets = [(os.path.join(state, "audit.jsonl"), "a", json.dumps(record) + "\\n")]
else:
    victim = os.path.join(state, "ticache", "bob")
    try:
        names = os.listdir(victim)
    except OSError as err:  # not even its file names: try the names Taichi uses
        print("refused listing", victim, repr(err), flush=True)
        names = ["ticache.tcb"]
    targets = [(os.path.join(victim, name), "r+", "tampered") for name in names]
    targets.append((os.path.join(victim, "planted"), "w", "planted"))
for path, mode, text in targets:
    try:
        with open(path, mode) as f:
            f.write(text)
        print("wrote", path, flush=True)
    except OSError as err:
        print("refused", path, repr(err), flush=True)
"""


def _tenants_supervisor(state: Path) -> Supervisor:
    """Tenants alice and bob; the audit log at its default place, <state_dir>/audit.jsonl. The
    filesystem stays writable: what stops these attacks must be the tenant's uid alone."""
    return Supervisor(Policy(tenants={"alice": Tenant(), "bob": Tenant()},
                             settings=Settings(state_dir=str(state), rootfs="writable")))


@needs_uid
def test_job_cannot_append_to_the_audit_log(tmp_path):
    state = tmp_path / "state"
    with _tenants_supervisor(state) as sup:
        r = sup.run(JobSpec(kernel=_script(tmp_path, "tamper.py", TAMPER), argv=["audit", str(state)], tenant="alice"))
        audit = sup.audit.path
    assert audit == state / "audit.jsonl"
    assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)
    forged = [line for line in audit.read_text().splitlines() if json.loads(line).get("job_id") == "forged"]
    assert forged == [], f"the job wrote the audit log: {forged}"


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir() if p.is_file()}


@needs_uid
def test_job_cannot_rewrite_another_tenants_offline_cache(tmp_path):
    state = tmp_path / "state"
    with _tenants_supervisor(state) as sup:
        assert sup.run(JobSpec(kernel=str(ROOT / "kernels" / "tiny.py"), tenant="bob")).verdict is Verdict.ok
        before = _digests(state / "ticache" / "bob")
        assert before, "bob's job wrote no offline cache"
        r = sup.run(JobSpec(kernel=_script(tmp_path, "tamper.py", TAMPER), argv=["cache", str(state)], tenant="alice"))
    assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)
    assert _digests(state / "ticache" / "bob") == before, f"alice's job changed bob's cache: {r.stdout_tail}"


# --- 6. /dev/shm files and SysV segments outlive the job (needs mount and IPC namespaces) ----------

SHM = """
import ctypes, sys
name, key, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(f"/dev/shm/{name}", "wb") as f:  # what shm_open() and multiprocessing.shared_memory create
    f.write(b"x" * size)
libc = ctypes.CDLL(None, use_errno=True)
libc.shmat.restype = ctypes.c_void_p
shmid = libc.shmget(key, size, 0o1000 | 0o600)  # IPC_CREAT
addr = libc.shmat(shmid, None, 0)
ctypes.memset(addr, 1, size)
libc.shmdt(ctypes.c_void_p(addr))
print("shmid", shmid, "errno", ctypes.get_errno(), flush=True)
"""

IPC_RMID = 0


def _sysv_segment(key: int) -> dict | None:
    """The segment with this key in our IPC namespace (/proc/sysvipc/shm), or None."""
    for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]:
        cols = line.split()
        if int(cols[0]) == key:
            return {"shmid": int(cols[1]), "size": int(cols[3]), "nattch": int(cols[6])}
    return None


@needs_namespaces
def test_dev_shm_files_and_sysv_segments_do_not_outlive_the_job(tmp_path):
    name = f"tsbx-attack-{secrets.token_hex(6)}"
    key = 0x5B000000 | secrets.randbelow(1 << 24)  # by key, never by id: ids differ between namespaces
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        with _supervisor(tmp_path) as sup:
            r = sup.run(JobSpec(kernel=_script(tmp_path, "shm.py", SHM), argv=[name, str(key), str(1 << 20)]))
        assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)
        assert not Path("/dev/shm", name).exists(), "the job's /dev/shm file outlived it"
        assert _sysv_segment(key) is None, f"the job's SysV segment outlived it: {_sysv_segment(key)}"
    finally:
        Path("/dev/shm", name).unlink(missing_ok=True)
        shmid = libc.shmget(key, 0, 0)
        if shmid >= 0:
            libc.shmctl(shmid, IPC_RMID, None)


# --- 7. Files in /tmp and /var/tmp outlive the job, and the next tenant reads them ------------------

DROP = """
import os, sys
name, size = sys.argv[1], int(sys.argv[2])
for top in ("/tmp", "/var/tmp"):
    with open(f"{top}/{name}", "wb") as f:  # world-writable on every host
        f.write(b"x" * size)
    os.chmod(f"{top}/{name}", 0o644)
"""

PICK_UP = """
import json, os, sys
found = {}
for top in ("/tmp", "/var/tmp"):
    try:
        found[top] = len(open(f"{top}/{sys.argv[1]}", "rb").read())
    except OSError as err:
        found[top] = type(err).__name__
st = os.statvfs("/tmp")
print(json.dumps({"found": found, "tmp_bytes": st.f_blocks * st.f_frsize, "cwd": os.getcwd(),
                  "up": sorted(os.listdir(".."))}))
"""


@needs_namespaces
def test_tmp_files_do_not_outlive_the_job_nor_reach_the_next_tenant(tmp_path):
    name = f"tsbx-attack-{secrets.token_hex(6)}"
    try:
        with _tenants_supervisor(tmp_path / "state") as sup:
            r = sup.run(JobSpec(kernel=_script(tmp_path, "drop.py", DROP), argv=[name, str(1 << 20)],
                                tenant="alice"))
            assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)
            for top in ("/tmp", "/var/tmp"):
                assert not Path(top, name).exists(), f"the job's {top} file outlived it"
            Path("/tmp", name).write_bytes(b"secret")  # a file of the host's, or of another tenant
            r = sup.run(JobSpec(kernel=_script(tmp_path, "pick.py", PICK_UP), argv=[name], tenant="bob",
                                limits=Limits(memory="512MiB")))
        assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)
        seen = json.loads(r.stdout_tail)
        assert seen["found"] == {"/tmp": "FileNotFoundError", "/var/tmp": "FileNotFoundError"}
        assert seen["tmp_bytes"] == 512 << 20  # a tmpfs the size of the job's memory limit
        assert seen["cwd"].startswith("/tmp/tsbx-") and name not in seen["up"]  # ".." is its own /tmp
    finally:
        for top in ("/tmp", "/var/tmp"):
            Path(top, name).unlink(missing_ok=True)
