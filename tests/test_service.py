"""The node service for real: a `taichi-sandbox serve` process on a temporary socket, and clients
that are real processes of other uids (as root: each client unshares a mount namespace only to
reach the interpreter under a 0700 /root, joins the socket's group, and drops to its uid).

Each test is a friction point of issue 14 that today's code (every CLI its own supervisor, the
tenant whatever the caller types) fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from sandbox.core.models import EXIT_CODES, Verdict
from sandbox.node import frames

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as other uids "
                                                            "(and jobs as their tenants' uids)")

ALICE, BOB, MALLORY = 59901, 59902, 59903  # client uids, below the tenants' job uid_range
SOCKET_GID = 59990
AS_CLIENT = """
import os, sys
from sandbox.job import mounts, namespaces
uid, gid = int(sys.argv[1]), int(sys.argv[2])
namespaces.unshare(namespaces.CLONE_NEWNS)  # only to reach the interpreter under a 0700 /root
mounts.mount(None, "/", None, mounts.MS_REC | mounts.MS_PRIVATE)
mounts.expose_paths([(p, False) for p in mounts.interpreter_paths()], uid, uid)
os.setgroups([gid])  # the socket's group
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
os.execv(sys.executable, [sys.executable, *sys.argv[3:]])
"""
SLEEP = "import sys, time\nprint('started', flush=True)\ntime.sleep(float(sys.argv[1]))\nprint('slept')\n"
POLICY = """
[defaults]
memory = "1GiB"  # without a memory limit a job reserves the whole node
[node]
cpu_slots = {cpu_slots}
[tenants.default]
max_concurrent = 4
[tenants.alice]
users = ["{alice}"]
max_concurrent = 1
max_queued = 1
[tenants.bob]
users = ["{bob}"]
max_concurrent = 2
[sandbox]
state_dir = "{state}"
[service]
socket = "{socket}"
group = "{gid}"
max_connections_per_uid = 4
request_rate = "20/s"
request_burst = 20
request_timeout = "1s"
idle_timeout = "3s"
{extra}
"""


class Node:
    """A service process on a temporary socket; started ready (sd_notify READY=1 received)."""

    def __init__(self, root: Path, extra: str = "", cpu_slots: int = 4, prefix: tuple[str, ...] = ()) -> None:
        self.prefix = prefix  # runs the service (e.g. setpriv with a unit's capabilities)
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        self.root, self.socket = root, root / "s.sock"
        self.limits = root / "limits.toml"
        self.limits.write_text(POLICY.format(alice=ALICE, bob=BOB, state=root / "state", socket=self.socket,
                                             gid=SOCKET_GID, extra=extra, cpu_slots=cpu_slots))
        self.audit = root / "state" / "audit.jsonl"
        self.start()

    def start(self) -> None:
        notify = self.root / "notify"
        notify.unlink(missing_ok=True)
        ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ready.bind(str(notify))
        ready.settimeout(60)
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "sandbox", "serve", "--limits-file",
                                      str(self.limits)],
                                     env={**os.environ, "NOTIFY_SOCKET": str(notify)},
                                     stderr=open(self.root / "service.log", "a"))
        try:
            assert ready.recv(100) == b"READY=1"
        finally:
            ready.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(self.socket))
        return sock

    def ask(self, message: dict) -> list[dict]:
        with self.connect() as sock:
            frames.send(sock, message)
            answers = []
            while True:
                answer = frames.recv(sock, idle=120, within=120)
                if answer is None:
                    return answers
                answers.append(answer)
                if answer["type"] in ("end", "error") or not message.get("follow"):  # else waits out idle_timeout
                    return answers

    def cli(self, uid: int, *args: str, cwd: Path, timeout: float = 120, **popen) -> subprocess.CompletedProcess:
        return subprocess.run(as_uid(uid, "-m", "sandbox", *args, "--socket", str(self.socket)), cwd=cwd,
                              capture_output=True, text=True, timeout=timeout, **popen)

    def records(self, kind: str) -> list[dict]:
        return [r for r in map(json.loads, self.audit.read_text().splitlines()) if r["type"] == kind]


def as_uid(uid: int, *args: str, gid: int = SOCKET_GID) -> list[str]:
    return [sys.executable, "-c", AS_CLIENT, str(uid), str(gid), *args]


def client_dir(tmp: Path, uid: int, **files: str) -> Path:
    """A directory only `uid` may enter (0700), holding its kernel files."""
    home = tmp / f"u{uid}"
    home.mkdir(mode=0o700)
    for name, text in files.items():
        (home / name).write_text(text)
        os.chown(home / name, uid, uid)
        (home / name).chmod(0o600)
    os.chown(home, uid, uid)
    return home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = Node(tmp_path_factory.mktemp("node"), extra=f"metrics_port = {free_port()}")
    yield n
    assert n.stop() == 0


def test_run_reads_the_kernel_as_the_client_and_streams_output_and_verdict(node, tmp_path):
    home = client_dir(tmp_path, ALICE, **{"mine.py": "import os\nprint('uid', os.getuid())\n"})
    done = node.cli(ALICE, "run", "mine.py", "--json", cwd=home)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["verdict"] == "ok" and result["stdout_tail"].startswith("uid 6")  # the tenant's uid, not alice's
    human = node.cli(ALICE, "run", "mine.py", cwd=home)
    assert human.returncode == 0 and human.stdout.startswith("uid 6") and "verdict: ok" in human.stderr
    (home / "big.py").write_text("def main():\n    return 'x' * 100_000\n")
    os.chown(home / "big.py", ALICE, ALICE)
    capped = node.cli(ALICE, "run", "big.py", "--entry", "main", "--max-result", "10KiB", cwd=home)
    assert capped.returncode == 114 and "verdict: result" in capped.stderr, capped.stderr
    # A path alone is never opened by the service (it would open it as root).
    refused = node.ask({"op": "submit", "jobs": [{"kernel": str(home / "mine.py")}]})[0]
    assert refused["jobs"][0]["state"] == "refused" and "send the file's contents" in refused["jobs"][0]["reason"]
    started = [r for r in node.records("started") if r["job_id"] == result["job_id"]]
    assert started and started[0]["uid"] == ALICE and started[0]["user"] == str(ALICE) and started[0]["host"]
    job = [r for r in node.records("job") if r["job_id"] == result["job_id"]][0]
    assert job["uid"] == ALICE and job["tenant"] == "alice" and job["client_pid"] > 0


def test_the_node_serves_one_metrics_endpoint_that_outlives_every_client(node):
    done = node.ask({"op": "submit", "jobs": [{"kernel": "m.py", "source": "print(1)\n", "tenant": "bob"}],
                     "follow": True, "output": False})
    assert [a["result"]["verdict"] for a in done if a["type"] == "result"] == ["ok"]
    port = int(node.limits.read_text().split("metrics_port = ")[1].split()[0])
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'taichi_sandbox_jobs_total{tenant="bob",verdict="ok"}' in text


def test_the_tenant_comes_from_the_peers_credentials(node, tmp_path):
    for uid in (ALICE, BOB, MALLORY):
        client_dir(tmp_path, uid, **{"t.py": "print(1)\n"})
    ran = {uid: node.cli(uid, "run", "t.py", "--json", cwd=tmp_path / f"u{uid}") for uid in (ALICE, BOB, MALLORY)}
    tenants = {uid: [r["tenant"] for r in node.records("job") if r["job_id"] == json.loads(done.stdout)["job_id"]][0]
               for uid, done in ran.items()}
    assert tenants == {ALICE: "alice", BOB: "bob", MALLORY: "default"}
    outsider = subprocess.run(as_uid(MALLORY, "-m", "sandbox", "ps", "--socket", str(node.socket), gid=MALLORY),
                              capture_output=True, text=True, timeout=60)
    assert outsider.returncode == 2  # the socket is 0660 and the uid is not in its group
    assert outsider.stderr == f"taichi-sandbox: error: cannot reach the node service at {node.socket}: " \
                              "Permission denied\n"
    impostor = node.cli(MALLORY, "run", "t.py", "--tenant", "alice", cwd=tmp_path / f"u{MALLORY}")
    assert impostor.returncode == 2
    assert impostor.stderr.strip().splitlines() == [
        f"taichi-sandbox: error: Refused: uid {MALLORY} ({MALLORY}) may not submit as tenant 'alice': neither the "
        "user nor one of its groups is in its users/groups"]


def test_a_tenants_concurrency_quota_holds_across_clients(node, tmp_path):
    home = client_dir(tmp_path, ALICE, **{"sleep.py": SLEEP})
    command = as_uid(ALICE, "-m", "sandbox", "run", "sleep.py", "--json", "--socket", str(node.socket), "--", "1")
    clients = [subprocess.Popen(command, cwd=home, stdout=subprocess.PIPE, text=True)]
    deadline = time.monotonic() + 60  # alice may queue one job (max_queued = 1): the first must have left the queue
    while "running" not in [j["state"] for j in node.ask({"op": "ps"})[0]["jobs"]]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    clients.append(subprocess.Popen(command, cwd=home, stdout=subprocess.PIPE, text=True))
    results = sorted((json.loads(c.communicate(timeout=120)[0]) for c in clients), key=lambda r: r["started_at"])
    assert [r["verdict"] for r in results] == ["ok", "ok"]
    assert results[0]["ended_at"] <= results[1]["started_at"], "alice's max_concurrent = 1 was exceeded"


def test_a_full_queue_is_answered_queue_full_naming_the_bound(node):
    job = {"kernel": "s.py", "source": SLEEP, "argv": ["60"], "tenant": "alice"}
    first = node.ask({"op": "submit", "jobs": [job]})[0]["jobs"]
    deadline = time.monotonic() + 60
    while [j["state"] for j in node.ask({"op": "ps"})[0]["jobs"]] != ["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    answer = node.ask({"op": "submit", "jobs": [job, job]})[0]["jobs"]
    try:
        assert [j["state"] for j in answer] == ["queued", "refused"], answer
        assert answer[1]["code"] == "QueueFull"
        assert answer[1]["reason"] == "tenant alice has 1 queued jobs (max_queued=1)"
    finally:
        for job in first + answer[:1]:
            assert node.ask({"op": "cancel", "job_id": job["job_id"]})[0]["type"] == "cancelled"


FLOOD = """
import json, select, socket, sys, time
from sandbox.node import frames
path, seconds = sys.argv[1], float(sys.argv[2])
held, codes, answered = [], {}, 0
for _ in range(50):  # far more connections than the service allows a uid
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    held.append(s)
time.sleep(0.5)
for s in select.select(held, [], [], 0.5)[0]:  # answered before asking anything: refused
    code = frames.recv(s)["code"]
    codes[code] = codes.get(code, 0) + 1
    held.remove(s)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for s in list(held):
        try:
            s.settimeout(5)
            frames.send(s, {"op": "ps"})
            answer = frames.recv(s, idle=5, within=5)
        except (OSError, frames.FrameError):
            held.remove(s)
            continue
        if answer is None:
            held.remove(s)
            continue
        answered += 1
        code = answer.get("code", answer["type"])
        codes[code] = codes.get(code, 0) + 1
print(json.dumps({"codes": codes, "answered": answered, "kept": len(held)}))
"""
VICTIM = """
import json, socket, sys, time
from sandbox.node import frames
path, source = sys.argv[1], open(sys.argv[2]).read()
latencies, verdicts = [], []
for i in range(4):
    s = socket.socket(socket.AF_UNIX)
    t = time.monotonic()
    s.connect(path)
    frames.send(s, {"op": "submit", "jobs": [{"kernel": "t.py", "source": source}], "follow": True, "output": False})
    answer = frames.recv(s)
    latencies.append(time.monotonic() - t)
    while answer["type"] != "end":
        if answer["type"] == "result":
            verdicts.append(answer["result"]["verdict"])
        answer = frames.recv(s)
    s.close()
print(json.dumps({"latencies": latencies, "verdicts": verdicts}))
"""


@pytest.mark.slow
def test_a_flood_from_one_uid_leaves_another_uids_submissions_answered(node, tmp_path):
    home = client_dir(tmp_path, BOB, **{"t.py": "print(1)\n"})
    flood = subprocess.Popen(as_uid(MALLORY, "-c", FLOOD, str(node.socket), "6"), stdout=subprocess.PIPE, text=True)
    time.sleep(1.5)  # the flood is on
    victim = subprocess.run(as_uid(BOB, "-c", VICTIM, str(node.socket), "t.py"), cwd=home, capture_output=True,
                            text=True, timeout=120)
    assert flood.poll() is None, "the flood ended before the victim was served: no proof"
    attack = json.loads(flood.communicate(timeout=60)[0])
    served = json.loads(victim.stdout)
    print(f"flood from uid {MALLORY}: {attack}; uid {BOB}: submission latencies "
          f"{[round(x * 1000) for x in served['latencies']]} ms, verdicts {served['verdicts']}")
    assert served["verdicts"] == ["ok"] * 4
    assert max(served["latencies"]) < 1.0, served
    assert attack["codes"].get("TooManyConnections", 0) >= 40  # 50 connections, 4 allowed
    assert attack["codes"].get("RateLimited", 0) > attack["codes"].get("ps", 0) > 0


HOLD = """
import json, select, socket, sys, time
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    held.append(s)
time.sleep(0.5)
refused = select.select(held, [], [], 0.5)[0]  # answered before asking anything: refused
from sandbox.node import frames
print(json.dumps([frames.recv(s)["message"] for s in refused]), flush=True)
sys.stdin.read()  # hold the rest until told
"""


def test_connections_of_all_uids_together_are_bounded(tmp_path):
    node = Node(tmp_path / "node", extra="max_connections = 6")
    try:
        holders = []
        for uid in (ALICE, BOB):
            holders.append(subprocess.Popen(as_uid(uid, "-c", HOLD, str(node.socket), "4"), stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True))
            refusals = json.loads(holders[-1].stdout.readline())
        assert refusals == ["the service already has 6 connections ([service] max_connections)"] * 2
        for holder in holders:
            holder.communicate("", timeout=30)
    finally:
        assert node.stop() == 0


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _verdict(node: Node, job_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while not (done := [r for r in node.records("job") if r["job_id"] == job_id]):
        assert time.monotonic() < deadline, f"job {job_id} has no verdict"
        time.sleep(0.1)
    return done[0]["verdict"]


def _settled(pid: int, at_most: int) -> int:
    deadline = time.monotonic() + 10
    while (count := _fds(pid)) > at_most and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


WRITER = "import sys, time\ntime.sleep(float(sys.argv[1]))\nfor n in range(int(sys.argv[2])):\n" \
         "    open(f'f{n:04}', 'w').write('x' * (3 + n % 40))\n"


@pytest.mark.slow
def test_clients_that_leave_stall_or_flood_descriptors_leave_the_service_whole(tmp_path):
    """Output files are handed back as descriptors and inputs come as descriptors: a client that
    leaves early, reads slowly or floods descriptors must cost the service nothing it keeps."""
    node = Node(tmp_path / "node")
    try:
        baseline = _fds(node.proc.pid)

        def submit(argv: list[str]) -> tuple[socket.socket, str]:
            sock = node.connect()
            frames.send(sock, {"op": "submit", "jobs": [{"kernel": "w.py", "source": WRITER, "argv": argv,
                                                          "outputs": ["*"]}], "follow": True, "output": False})
            return sock, frames.recv(sock, idle=30, within=30)["jobs"][0]["job_id"]
        # 1. it leaves while its job runs: the job is cancelled, its outputs never held
        sock, job_id = submit(["1", "40"])
        sock.close()
        assert _verdict(node, job_id) == "cancelled"
        # 2. it leaves before reading the `submitted` answer
        sock = node.connect()
        frames.send(sock, {"op": "submit", "jobs": [{"kernel": "w.py", "source": WRITER, "argv": ["2", "1000"],
                                                      "outputs": ["*"]}], "follow": True, "output": False})
        sock.close()
        time.sleep(4)
        assert node.proc.poll() is None and node.ask({"op": "ps"})[0]["jobs"] == []
        assert [r["verdict"] for r in node.records("job")][-1] == "cancelled"
        # 3. it reads slowly: a finished job's 1000 output files hold no descriptor until sent
        sock, job_id = submit(["0", "1000"])
        assert _verdict(node, job_id) == "ok"
        held = _fds(node.proc.pid) - baseline
        received = 0
        while (answer := frames.recv(sock, idle=30, within=30, fds=(fds := [])))["type"] != "end":
            received += answer["type"] == "file"
            for fd in fds:
                os.close(fd)
        sock.close()
        assert received == 1000 and held < 50, held
        # 4. it floods descriptors within one frame
        flood = node.connect()
        flood.sendall(struct.pack("!I", 1000))
        with open("/dev/null") as null:
            try:
                for _ in range(40):
                    socket.send_fds(flood, [b" "], [null.fileno()] * 253)
            except OSError:
                pass  # the service gave up on this connection
        answer = frames.recv(flood, idle=30, within=30)
        flood.close()
        assert answer["code"] == "TooManyDescriptors", answer
        assert node.proc.poll() is None and node.ask({"op": "ps"})[0]["type"] == "ps"
        assert _settled(node.proc.pid, baseline + 5) <= baseline + 5
        assert not list((node.root / "state" / "spool").iterdir())
    finally:
        assert node.stop() == 0


@pytest.mark.slow
def test_what_a_uids_unfinished_jobs_hold_in_the_services_memory_is_bounded(tmp_path):
    """Queued jobs keep their requests (kernel source, args, shipped code) in the root service's memory."""
    node = Node(tmp_path / "node", extra='max_held_bytes_per_uid = "1MiB"')
    try:
        job = {"kernel": "s.py:main", "source": "import time\ndef main(pad):\n    time.sleep(60)\n",
               "args": ["A" * 600_000]}
        first = ask_as(node, MALLORY, {"op": "submit", "jobs": [job]})[0]["jobs"][0]
        second = ask_as(node, MALLORY, {"op": "submit", "jobs": [job]})[0]["jobs"][0]
        assert first["state"] == "queued" and second["state"] == "refused", second
        assert second["code"] == "QueueFull" and "max_held_bytes_per_uid=1048576" in second["reason"]
        node.ask({"op": "cancel", "job_id": first["job_id"]})
        assert _verdict(node, first["job_id"]) == "cancelled"
        third = ask_as(node, MALLORY, {"op": "submit", "jobs": [job]})[0]["jobs"][0]
        assert third["state"] == "queued", third  # what the first held was given back
        node.ask({"op": "cancel", "job_id": third["job_id"]})
    finally:
        assert node.stop() == 0


HOARD = """
import collections, json, os, socket, sys, time
from sandbox.node import frames
fd = os.open("/etc/passwd", os.O_RDONLY)  # any file she may read, sent again and again
job = {"kernel": "s.py", "source": "import time\\ntime.sleep(60)\\n", "inputs": [f"i{n}" for n in range(64)]}
codes = collections.Counter()
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(30)
end = time.monotonic() + 60
while codes["queued"] * 64 < int(sys.argv[2]) and time.monotonic() < end:
    frames.send(s, {"op": "submit", "jobs": [job] * 3}, [fd] * 192)
    answer = frames.recv(s, idle=30, within=30)
    if answer["type"] == "error":
        codes[answer["code"]] += 1
        time.sleep(0.05)
        if answer["code"] != "RateLimited":
            break
        continue
    codes.update(j["state"] if j["state"] != "refused" else j["code"] for j in answer["jobs"])
    if codes["QueueFull"]:
        break
print(json.dumps(codes))
"""


def test_input_descriptors_held_for_queued_jobs_cannot_exhaust_the_services_files(tmp_path):
    """Each queued job holds its inputs' descriptors: one uid queueing jobs with many inputs must not
    use up the service's file table, which would leave it unable to accept anyone or start a job."""
    node = Node(tmp_path / "node", extra='drain_timeout = "1s"', cpu_slots=8)  # her 4 running jobs leave 4
    try:
        nofile = int(Path(f"/proc/{node.proc.pid}/limits").read_text().split("Max open files")[1].split()[0])
        hoard = subprocess.run(as_uid(MALLORY, "-c", HOARD, str(node.socket), str(nofile + 1000)),
                               capture_output=True, text=True, timeout=120, cwd="/")
        assert hoard.returncode == 0, hoard.stderr
        codes = json.loads(hoard.stdout)
        home = client_dir(tmp_path, BOB, **{"t.py": "print('served')\n"})
        served = node.cli(BOB, "run", "t.py", cwd=home, timeout=60)
        assert served.returncode == 0 and served.stdout == "served\n", (codes, served.stderr)
        assert codes.get("QueueFull") and codes["queued"] * 64 <= 1024, codes
    finally:
        assert node.stop() == 0


def _raw(node: Node, data: bytes, shut: bool = False, wait: float = 5.0) -> dict | None:
    with node.connect() as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        return frames.recv(sock, idle=wait, within=wait)


def test_garbage_truncated_oversized_and_slow_frames_get_an_error_answer(node):
    def frame(payload: bytes) -> bytes:
        return struct.pack("!I", len(payload)) + payload
    cases = {
        "GET / HTTP/1.1\r\n\r\n".encode(): "FrameTooLarge",
        struct.pack("!I", 1 << 30) + b"{}": "FrameTooLarge",
        frame(b"\xff\xfe not json"): "BadFrame",
        frame(b"[1, 2]"): "BadFrame",
        frame(json.dumps({"op": "launch_missiles"}).encode()): "BadRequest",
        frame(json.dumps({"op": "submit", "jobs": []}).encode()): "BadRequest",
        frame(json.dumps({"op": "submit", "jobs": [{"kernel": "x.py", "source": 5}]}).encode()): "BadRequest",
    }
    for data, code in cases.items():
        answer = _raw(node, data)
        assert answer["type"] == "error" and answer["code"] == code, (data[:40], answer)
        assert "\n" not in answer["message"]
    named = node.ask({"op": "submit", "jobs": [{"kernel": "x.py", "source": "1", "job_id": "mine"}]})[0]["jobs"][0]
    assert named["state"] == "refused" and named["reason"] == "job 1: job_id: the service names jobs"
    typo = node.ask({"op": "submit", "jobs": [{"kernel": "x.py", "source": "1", "limits": {"memroy": "1GiB"}}]})
    assert typo[0]["jobs"][0]["reason"].startswith("job 1: ") and "limits.memroy: unknown key (did you mean 'memory'?)" in typo[0]["jobs"][0]["reason"]
    truncated = _raw(node, frame(b'{"op": "ps"}')[:8], shut=True)
    assert truncated["code"] == "Truncated" and "4 of 12 bytes" in truncated["message"], truncated
    slow = _raw(node, frame(b'{"op": "ps"}')[:8])  # and nothing more: request_timeout is 1 s
    assert slow["code"] == "Timeout", slow
    idle = _raw(node, b"")
    assert idle["code"] == "IdleTimeout", idle
    assert node.ask({"op": "ps"})[0]["type"] == "ps" and node.proc.poll() is None


def test_events_ps_logs_and_cancel_across_users(node, tmp_path):
    home = client_dir(tmp_path, BOB, **{"sleep.py": SLEEP})
    events = node.connect()
    frames.send(events, {"op": "events"})
    run = subprocess.Popen(as_uid(BOB, "-m", "sandbox", "run", "sleep.py", "--socket", str(node.socket), "--", "60"),
                           cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (jobs := [j for j in node.ask({"op": "ps"})[0]["jobs"] if j["state"] == "running"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    job = jobs[0]
    assert (job["tenant"], job["user"], job["uid"]) == ("bob", str(BOB), BOB)
    other = client_dir(tmp_path, MALLORY)
    assert node.cli(MALLORY, "ps", "--json", cwd=other).stdout.strip() == "[]"  # not hers to see
    quota = json.loads(node.cli(MALLORY, "quota", "--json", cwd=other).stdout)  # the node's, not one process's
    assert set(quota["tenants"]) == {"default"} and quota["node"]["cpu_slots"][0] >= 1  # bob's is not hers
    denied = node.cli(MALLORY, "cancel", job["job_id"], cwd=other)
    assert denied.returncode == 2 and "no such job (or not yours)" in denied.stderr
    while "started" not in node.cli(BOB, "logs", job["job_id"], cwd=home).stdout:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert node.cli(BOB, "cancel", job["job_id"], cwd=home).returncode == 0
    out, err = run.communicate(timeout=60)
    assert run.returncode == EXIT_CODES[Verdict.cancelled] and "started" in out and "verdict: cancelled" in err, err
    seen = frames.recv(events, idle=30, within=30)["event"]
    while seen.get("job_id") != job["job_id"]:
        seen = frames.recv(events, idle=30, within=30)["event"]
    events.close()
    assert seen["type"] == "verdict" and seen["verdict"] == "cancelled" and seen["uid"] == BOB


def test_a_followed_job_held_to_a_lease_ends_when_it_lapses_or_is_lost(tmp_path):
    """`lease` frames on the connection that follows the job (what a Ray worker sends for the job it
    runs here): unrenewed past `seconds`, or `lost`, the job ends with verdict `crashed` naming its
    lease, long before its wall_time. Nowhere else: no other client can touch another's lease."""
    node = Node(tmp_path / "node")  # its own: none of root's connections held by other tests
    try:
        _leases_on_the_follow_connection(node)
    finally:
        assert node.stop() == 0


def _leases_on_the_follow_connection(node: Node) -> None:
    job = {"kernel": "s.py", "source": "import time\ntime.sleep(60)\n", "limits": {"wall_time": "120s"}}
    elsewhere = node.ask({"op": "lease", "job_id": "x", "seconds": 1})[0]
    assert elsewhere["code"] == "BadRequest" and "only on the connection" in elsewhere["message"], elsewhere
    with contextlib.ExitStack() as held:
        for _ in range(3):  # with ours, every connection root may hold here
            held.enter_context(_following(node, [job])[0])
        sock, submitted = _following(node, [job, job])
        held.enter_context(sock)
        first, second = [j["job_id"] for j in submitted["jobs"]]
        with node.connect() as extra:  # refused at once, unread: leases need no connection of their own
            assert frames.recv(extra, idle=10, within=10)["code"] == "TooManyConnections"
        frames.send(sock, {"op": "lease", "job_id": first})  # neither seconds nor lost
        frames.send(sock, {"op": "lease", "job_id": "not-followed-here", "lost": "x"})
        frames.send(sock, {"op": "lease", "job_id": first, "seconds": 2, "room": 60})
        frames.send(sock, {"op": "lease", "job_id": second, "lost": "the authority\nfreed it"})
        answers = []
        while (answer := frames.recv(sock, idle=60, within=60)) is not None and answer["type"] != "end":
            answers.append(answer)
    assert [a["code"] for a in answers if a["type"] == "error"] == ["BadRequest", "NotFound"], answers
    results = {a["job_id"]: a["result"] for a in answers if a["type"] == "result"}
    for job_id, why in ((first, "not renewed for"), (second, "the authority freed it")):
        assert results[job_id]["verdict"] == "crashed", results[job_id]
        assert "its cluster lease lapsed" in results[job_id]["reason"] and why in results[job_id]["reason"]
        assert results[job_id]["usage"]["wall_seconds"] < 30


def _following(node: Node, jobs: list[dict]) -> tuple[socket.socket, dict]:
    """A connection that submitted `jobs` and follows them, and its `submitted` answer; tried again
    while the service still counts the connections of a moment ago against the uid."""
    deadline, answer = time.monotonic() + 10, None
    while True:
        sock = node.connect()
        try:
            frames.send(sock, {"op": "submit", "jobs": jobs, "follow": True})
            answer = frames.recv(sock, idle=30, within=30)
            if answer is not None and answer["type"] == "submitted":
                return sock, answer
        except OSError:
            pass
        sock.close()
        assert time.monotonic() < deadline, f"no connection admitted: {answer}"
        time.sleep(0.1)


ASK_AS = """
import json, socket, sys
from sandbox.node import frames
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
frames.send(s, message := json.loads(sys.stdin.read()))
while (answer := frames.recv(s, idle=120, within=120)) is not None:
    print(json.dumps(answer), flush=True)
    if answer["type"] in ("end", "error") or not message.get("follow"):
        break
"""


def ask_as(node: Node, uid: int, message: dict) -> list[dict]:
    """`message` sent as a raw frame by a process of `uid`; its answers."""
    done = subprocess.run(as_uid(uid, "-c", ASK_AS, str(node.socket)), input=json.dumps(message),
                          capture_output=True, text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_a_client_cannot_make_the_service_open_paths_of_its_choosing(node, tmp_path):
    """The service runs as root: a path in a request (an input to read, an output dir to write)
    would be opened with root's permissions, or the job's, never the client's."""
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o711)  # root's: clients may pass through, not list or write
    secret = vault / "secret"
    secret.write_text("not for mallory\n")
    os.chown(secret, 0, MALLORY)
    secret.chmod(0o604)  # her group may not read it; other uids (the job's) may
    plant = {"kernel": "w.py", "source": "open('planted', 'w').write('x')\n", "outputs": ["*"],
             "output_dir": str(vault)}
    steal = {"kernel": "r.py", "source": "print(open('secret').read())\n", "inputs": [str(secret)]}
    for job, field in ((plant, "output_dir"), (steal, "inputs")):
        answers = ask_as(node, MALLORY, {"op": "submit", "jobs": [job], "follow": True, "output": False})
        assert not (vault / "planted").exists(), "the service wrote a job's file into a root-only directory"
        assert not any("not for mallory" in a["result"]["stdout_tail"] for a in answers if a["type"] == "result")
        refusal = answers[0]["message"] if answers[0]["type"] == "error" else answers[0]["jobs"][0]["reason"]
        assert field in refusal and "path" in refusal, answers[0]
    # nor jump the node's queue, nor lift the limits of its tenant
    greedy = [{"kernel": "g.py", "source": "print(1)\n", "priority": 1},
              {"kernel": "g.py", "source": "print(1)\n", "limits": {"memory": "500GiB"}},
              {"kernel": "g.py", "source": "print(1)\n", "priority": -10**400}]  # ageing would overflow
    answer = ask_as(node, MALLORY, {"op": "submit", "jobs": greedy})[0]["jobs"]
    assert [j["state"] for j in answer] == ["refused", "refused", "refused"], answer
    assert "a job may lower its priority" in answer[0]["reason"] and "memory" in answer[1]["reason"], answer
    assert "greater than or equal to -1000000" in answer[2]["reason"], answer


MULTI_FILE = """
import os, helper
os.makedirs("out", exist_ok=True)
open("out/answer.txt", "w").write(str(helper.double(int(open("data.txt").read()))))
os.symlink("/etc/shadow", "out/shadow")
print("uid", os.getuid())
"""


def test_inputs_and_outputs_travel_as_descriptors_with_the_clients_permissions(node, tmp_path):
    """A kernel of several files, with data, through the service: alice's 0600 files, which the
    job's uid could not open, reach the job; its output files come back into her directory, written
    by her client; the symlink it planted does not."""
    home = client_dir(tmp_path, ALICE, **{"main.py": MULTI_FILE, "helper.py": "def double(x):\n    return 2 * x\n",
                                          "data.txt": "21\n"})
    done = node.cli(ALICE, "run", "main.py", "--input", "helper.py", "--input", str(home / "data.txt"),
                    "--output-dir", "results", "--json", cwd=home)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["verdict"] == "ok" and result["stdout_tail"].startswith("uid 6"), result
    answer = home / "results" / "out" / "answer.txt"
    assert answer.read_text() == "42" and answer.stat().st_uid == ALICE
    assert result["outputs"] == [str(answer)]  # not the kernel, not the inputs, not the symlink
    assert sorted(p.name for p in (home / "results").rglob("*")) == ["answer.txt", "out"]
    assert any("1 entries skipped" in note and "out/shadow" in note for note in result["notes"]), result["notes"]
    assert not list((node.root / "state" / "spool").iterdir())  # the service's copies are gone
    unreadable = node.cli(ALICE, "run", "main.py", "--input", "/etc/shadow", cwd=home)
    assert unreadable.returncode == 2
    assert unreadable.stderr == "taichi-sandbox: error: input /etc/shadow: Permission denied\n"


def test_input_directories_and_the_default_copy_back_work_through_the_service(node, tmp_path):
    """As in-process: a directory input keeps its layout (its symlink named, not followed), and the
    files the job leaves come back into the client's cwd, new names only."""
    home = client_dir(tmp_path, BOB, **{"job.py": "open('out.txt', 'w').write(open('data/sub/n.txt').read() * 2)\n"})
    (home / "data" / "sub").mkdir(parents=True)
    (home / "data" / "sub" / "n.txt").write_text("21")
    os.symlink("/etc/hostname", home / "data" / "link")
    for path in (home / "data", home / "data" / "sub", home / "data" / "sub" / "n.txt", home / "data" / "link"):
        os.lchown(path, BOB, BOB)
    done = node.cli(BOB, "run", "job.py", "--input", "data", "--json", cwd=home)
    result = json.loads(done.stdout)
    assert done.returncode == 0 and (home / "out.txt").read_text() == "2121", done.stderr
    assert result["outputs"] == [str(home / "out.txt")]
    assert any(n.startswith("WARNING: inputs: 1 entries") and "data/link" in n for n in result["notes"])
    again = json.loads(node.cli(BOB, "run", "job.py", "--input", "data", "--json", cwd=home).stdout)
    assert again["outputs"] == [] and any("their names exist" in n and "out.txt" in n for n in again["notes"])


def test_a_batch_goes_in_as_many_requests_as_its_jobs_and_inputs_need(node, tmp_path):
    from sandbox.remote import Job, split
    assert [len(r) for r in split([Job("m:f") for _ in range(2500)])] == [1000, 1000, 500]
    big = Job("m:f", args=["x" * (3 << 20)])  # three of them exceed one request's 8 MiB
    assert [len(r) for r in split([big, big, big])] == [1, 1, 1]
    files = {f"in{n}.txt": str(n) for n in range(60)}
    inputs = ", ".join(f'"in{n}.txt"' for n in range(60))
    manifest = f'[[job]]\nkernel = "count.py"\ninputs = [{inputs}]\n' * 5  # 300 descriptors: two requests
    home = client_dir(tmp_path, BOB, **files, **{"count.py": "import glob\nprint(len(glob.glob('in*.txt')))\n",
                                                "jobs.toml": manifest})
    done = node.cli(BOB, "batch", "--manifest", "jobs.toml", "--json", cwd=home)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["stdout_tail"] for line in done.stdout.splitlines()] == ["60\n"] * 5


SEND_FDS = """
import json, os, socket, sys
from sandbox.node import frames
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
read_end, _ = os.pipe()
job = {"kernel": "t.py", "source": "print(1)", "inputs": ["a.txt"]}
frames.send(s, {"op": "submit", "jobs": [job]}, [read_end])
print(json.dumps(frames.recv(s, idle=60, within=60)))
frames.send(s, {"op": "submit", "jobs": [job]}, [read_end, read_end])
print(json.dumps(frames.recv(s, idle=60, within=60)))
"""


def test_input_descriptors_must_be_readable_regular_files_one_per_input(node):
    done = subprocess.run(as_uid(BOB, "-c", SEND_FDS, str(node.socket)), capture_output=True, text=True, timeout=60,
                          cwd="/")
    pipe, extra = map(json.loads, done.stdout.splitlines())
    assert pipe["jobs"][0]["state"] == "refused" and pipe["jobs"][0]["reason"] == "inputs: a.txt: not a regular file"
    assert extra["code"] == "BadRequest" and extra["message"].startswith("1 inputs named, 2 file descriptors")
    assert len(os.listdir(f"/proc/{node.proc.pid}/fd")) < 64  # none kept


def test_a_job_whose_client_goes_away_is_cancelled(node, tmp_path):
    home = client_dir(tmp_path, BOB, **{"sleep.py": SLEEP})
    client = subprocess.Popen(as_uid(BOB, "-m", "sandbox", "run", "sleep.py", "--socket", str(node.socket), "--",
                                     "60"), cwd=home, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (jobs := [j for j in node.ask({"op": "ps"})[0]["jobs"] if j["user"] == str(BOB)
                        and j["state"] == "running"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    client.kill()
    client.communicate()
    while not (ended := [r for r in node.records("job") if r["job_id"] == jobs[0]["job_id"]]):
        assert time.monotonic() < deadline, "the job outlived its client"
        time.sleep(0.1)
    assert ended[0]["verdict"] == "cancelled" and ended[0]["usage"]["wall_seconds"] < 30


def test_the_client_imports_little(node, tmp_path):
    (tmp_path / "t.py").write_text("print(1)\n")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "sandbox", "run", "t.py", "--json", "--socket",
                           str(node.socket)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert json.loads(done.stdout)["verdict"] == "ok"
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    assert not imported & {"taichi", "psutil", "pydantic", "rich", "typer", "numpy"}, imported


def _job_processes(job_id: str) -> list[int]:
    """Live processes whose working directory is the job's own (even inside its namespaces)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if f"/tsbx-{job_id}-" in os.readlink(f"/proc/{pid}/cwd") and state != "Z":
                found.append(int(pid))
        except OSError:
            continue
    return found


def test_sigkill_of_the_service_leaves_no_job_alive_and_a_restart_records_it_aborted(tmp_path):
    node = Node(tmp_path / "node")
    try:
        answers = node.ask({"op": "submit", "jobs": [{"kernel": "s.py", "source": SLEEP, "argv": ["60"]}]})
        job_id = answers[0]["jobs"][0]["job_id"]
        deadline = time.monotonic() + 60
        while not _job_processes(job_id):
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.1)
        assert node.stop(signal.SIGKILL) == -signal.SIGKILL
        while _job_processes(job_id) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        assert _job_processes(job_id) == []
        started = [r for r in node.records("started") if r["job_id"] == job_id]
        aborted = [r for r in node.records("aborted") if r["job_id"] == job_id]
        assert len(started) == 1 and started[0]["uid"] == 0  # who submitted it
        assert len(aborted) == 1 and aborted[0]["by"] == "fork-server"  # it outlived the service
        # A job whose fork-server died too (simulated: a started record and nothing after it) is
        # found at the restart.
        with node.audit.open("a") as f:
            f.write(json.dumps({**started[0], "job_id": "lost-job"}) + "\n")
        node.start()
        aborted = [r for r in node.records("aborted") if r["job_id"] in (job_id, "lost-job")]
        assert [r["job_id"] for r in aborted] == [job_id, "lost-job"]
        assert aborted[1]["uid"] == 0 and "killed or crashed" in aborted[1]["reason"]
    finally:
        node.stop(signal.SIGKILL)


@pytest.fixture
def draining(tmp_path):
    node = Node(tmp_path / "node", extra='drain_timeout = "3s"')
    yield node
    if node.proc.poll() is None:
        node.stop(signal.SIGKILL)


def test_sigterm_drains_finishes_running_jobs_then_cancels_the_rest(draining):
    node = draining
    job = {"kernel": "s.py", "source": SLEEP}
    first = node.ask({"op": "submit", "jobs": [{**job, "argv": ["60"], "tenant": "alice"}]})[0]["jobs"][0]["job_id"]
    deadline = time.monotonic() + 60
    while [j["state"] for j in node.ask({"op": "ps"})[0]["jobs"]] != ["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    jobs = [{**job, "argv": [seconds], "tenant": tenant} for seconds, tenant in (("0.5", "bob"), ("60", "default"),
                                                                                 ("0", "alice"))]
    answers: list[dict] = []
    follower = threading.Thread(target=lambda: answers.extend(node.ask({"op": "submit", "jobs": jobs, "follow": True,
                                                                        "output": False})))
    follower.start()
    while len(node.records("started")) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):
        node.connect()  # no longer admitting
    assert node.proc.wait(30) == 0
    took = time.monotonic() - t
    follower.join(10)
    ids = [j["job_id"] for j in answers[0]["jobs"]]
    by_id = {a["job_id"]: a["result"] for a in answers if a["type"] == "result"}
    assert [by_id[i]["verdict"] for i in ids] == ["ok", "cancelled", "cancelled"], answers
    assert "shutting down" in by_id[ids[2]]["reason"] and answers[-1]["type"] == "end"
    assert [r["verdict"] for r in node.records("job") if r["job_id"] == first] == ["cancelled"]
    assert 3.0 <= took < 3.0 + 2.0 + 3.0, took  # drain_timeout, then the jobs' grace (2 s) at most
    assert {r["job_id"] for r in node.records("job")} >= set(ids) and node.records("service")


def test_serve_check_validates_the_configuration(tmp_path):
    limits = tmp_path / "limits.toml"
    limits.write_text('[tenants.a]\nusers = ["root", 1000]\ngroups = ["root"]\n[service]\nsocket = "/tmp/x.sock"\n')
    ok = subprocess.run([sys.executable, "-m", "sandbox", "serve", "--check", "--limits-file", str(limits)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "ok (socket /tmp/x.sock, 1 tenants, 1 with users/groups" in ok.stdout
    for text, message in (('[tenants.a]\nusers = ["no-such-user-14"]\n', "users: no such user 'no-such-user-14'"),
                          ('[service]\nmax_conections_per_uid = 3\n', "max_conections_per_uid: unknown key (did you mean 'max_connections_per_uid'?)"),
                          ('[service]\nunknown_users = "maybe"\n', "unknown_users: Input should be 'default' or 'refuse' (got 'maybe')"),
                          ('[service]\ngroup = "no-such-group-14"\n', "group='no-such-group-14': no such group")):
        limits.write_text(text)
        bad = subprocess.run([sys.executable, "-m", "sandbox", "serve", "--check", "--limits-file", str(limits)],
                             capture_output=True, text=True)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and message in bad.stderr, bad.stderr


def test_a_socket_passed_by_systemd_is_used_as_is(tmp_path):
    """Socket activation (deploy/taichi-sandbox.socket): systemd listens, then passes fd 3 with
    LISTEN_FDS=1 and LISTEN_PID=the service's pid; clients that connected before the service started
    are served."""
    node = Node.__new__(Node)
    node.root, node.socket = tmp_path, tmp_path / "activated.sock"
    limits = tmp_path / "limits.toml"
    limits.write_text(f'[sandbox]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[service]\nsocket = "{tmp_path / "unused.sock"}"\n')
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(node.socket))
    listener.listen(8)
    early = node.connect()  # queued in the backlog before the service exists
    frames.send(early, {"op": "ps"})
    activate = (f"import os, sys; os.dup2({listener.fileno()}, 3); os.environ.update(LISTEN_PID=str(os.getpid()), "
                f"LISTEN_FDS='1'); os.execv(sys.executable, [sys.executable, '-m', 'sandbox', 'serve', "
                f"'--limits-file', {str(limits)!r}])")
    proc = subprocess.Popen([sys.executable, "-c", activate], pass_fds=(listener.fileno(),),
                            stderr=open(tmp_path / "service.log", "w"))
    try:
        assert frames.recv(early, idle=60, within=60) == {"type": "ps", "jobs": []}
        assert not (tmp_path / "unused.sock").exists()
    finally:
        early.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        listener.close()
    assert node.socket.exists()  # systemd's socket, not the service's to remove
