"""The CLI's side of the warm server: `run_warm` hands a `run` to the caller's server and exits
with its status; it returns, having done nothing, whenever the in-process CLI should run instead
(when there is no server, after starting one for the next run: waiting for it would cost more
than running in-process). `command` is `taichi-sandbox warm start|status|stop`."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import struct
import sys

from . import ENV_DIR, ENV_SWITCH, FORWARDED, HEADER, Unsafe, private_dir, stamp

EXIT_INTERNAL = 125
START_TIMEOUT = 30.0  # seconds for a new server to listen (`warm start`), or a worker to answer
JOB_MARKER = "TAICHI_SANDBOX_JOB"  # sandbox.job.launcher's: inside a job, sandboxes are refused in-process


def run_warm(argv: list[str]) -> None:
    """Run `sandbox.cli` with `argv` (sys.argv's form) in a warm worker and exit with its status;
    return when it should run here instead (warm off, inside a job, no usable server)."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or os.environ.get(JOB_MARKER) or not sys.platform.startswith("linux"):
        return
    try:
        directory, name = private_dir(), stamp()
        conn = _connect(directory, name)
        if conn is None:
            start_server(directory, name, wait=False)  # for the next run: this one runs in-process
            return
        with conn:
            if not _hand_over(conn, argv):
                return
            code = _follow(conn)
    except (OSError, ValueError):
        return  # nothing ran yet: the in-process CLI does it
    sys.exit(code)


def _connect(directory: str, name: str) -> socket.socket | None:
    """A connection to the server at directory/name.sock, whose peer is this uid; None when none answers."""
    path = os.path.join(directory, f"{name}.sock")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        conn.close()
        return None
    _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if uid != os.geteuid():
        conn.close()
        raise Unsafe(f"{path}: served by uid {uid}")
    return conn


def start_server(directory: str, name: str, wait: bool) -> None:
    """Start a server (detached, isolated, single-threaded BLAS); with `wait`, until it listens
    or gives up (a server for `name` that runs already makes a new one give up at once)."""
    import subprocess

    from ..job.interpreter import sandbox_module
    ready_r, ready_w = os.pipe()
    threads = dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"), "1")
    try:
        starter = subprocess.Popen(sandbox_module("sandbox.warm.server", str(ready_w), directory, name),
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   pass_fds=(ready_w,), env={**os.environ, **threads}, start_new_session=True)
    finally:
        os.close(ready_w)  # the server's own copy signals readiness by a line, failure by EOF
    with os.fdopen(ready_r, "rb") as ready:
        if wait:
            starter.wait()  # it detaches at once
            if select.select([ready], [], [], START_TIMEOUT)[0]:
                ready.readline()


def _hand_over(conn: socket.socket, argv: list[str]) -> bool:
    """Send the request; True when the worker took it ("ok"), False to run in-process."""
    request = json.dumps({
        "argv": argv, "env": dict(os.environ), "umask": _umask(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "affinity": sorted(os.sched_getaffinity(0)),
        "rlimits": rlimits(),
    }).encode()
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY)
    try:
        data = HEADER.pack(len(request)) + request
        sent = socket.send_fds(conn, [data], [0, 1, 2, cwd])
        conn.sendall(data[sent:])
    finally:
        os.close(cwd)
    conn.settimeout(START_TIMEOUT)  # a stopped server: run in-process rather than hang
    if _line(conn) != b"ok":
        return False
    conn.settimeout(None)
    return True


def rlimits() -> dict[str, list[int]]:
    """This process's rlimits, by name."""
    return {name: list(resource.getrlimit(getattr(resource, name))) for name in dir(resource)
            if name.startswith("RLIMIT_")}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _line(conn: socket.socket) -> bytes:
    """One line from the worker, without its newline ("" at EOF)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(1)
        if not chunk:
            return b""
        data += chunk
    return data[:-1]


def _follow(conn: socket.socket) -> int:
    """Commit ("go"), then forward our signals until the worker's exit status. A worker that ends
    without one after a forwarded signal died of it (as the CLI would have, before its handlers
    were in place): so do we; otherwise 125."""
    forwarded: list[int] = []

    def forward(signum: int, _frame) -> None:
        forwarded.append(signum)
        _send(conn, f"sig {signum}\n")
    signals = [getattr(signal, name) for name in FORWARDED]
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)  # none between "go" and our handlers
    try:
        for signum in signals:
            signal.signal(signum, forward)
        conn.sendall(b"go\n")  # a worker that does not hear this never runs the CLI
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    try:
        line = _line(conn).split()
    except OSError:  # committed: never run in-process after this
        line = []
    if len(line) == 2 and line[0] == b"exit" and line[1].isdigit():
        return int(line[1])
    if forwarded:
        signal.signal(forwarded[0], signal.SIG_DFL)
        os.kill(os.getpid(), forwarded[0])
    sys.stderr.write("taichi-sandbox: error: the warm server's worker ended before the verdict "
                     f"(set {ENV_SWITCH}=0 to run in-process)\n")
    return EXIT_INTERNAL


def _send(conn: socket.socket, line: str) -> None:
    try:
        conn.sendall(line.encode())
    except OSError:
        pass


def command(argv: list[str]) -> int:
    """`taichi-sandbox warm start|status|stop`: start one (and wait until it listens), list or
    stop this user's warm servers."""
    if argv not in (["start"], ["status"], ["stop"]):
        sys.stderr.write("usage: taichi-sandbox warm start|status|stop   (warm servers of this user; "
                         f"{ENV_SWITCH}=0 turns them off, {ENV_DIR} moves their sockets)\n")
        return 2
    try:
        directory = private_dir()
        if argv == ["start"]:
            start_server(directory, stamp(), wait=True)
    except OSError as err:
        sys.stderr.write(f"taichi-sandbox: error: {err}\n")
        return 2
    found = servers(directory)
    for pid, name in found:
        if argv == ["stop"]:
            os.kill(pid, signal.SIGTERM)
        print(f"{'stopped' if argv == ['stop'] else 'running'}: warm server {pid} ({directory}/{name}.sock)")
    if not found:
        print(f"no warm server in {directory}")
    return 0


def servers(directory: str) -> list[tuple[int, str]]:
    """(pid, stamp) of each live warm server of this uid in `directory` (its pid file names a
    process of ours whose command line is the server's)."""
    found = []
    for entry in sorted(os.listdir(directory)):
        if not entry.endswith(".pid"):
            continue
        try:
            with open(os.path.join(directory, entry), "rb") as f:
                pid = int(f.read(32))
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                alive = b"sandbox.warm.server" in f.read() and os.stat(f"/proc/{pid}").st_uid == os.geteuid()
        except (OSError, ValueError):
            continue
        if alive:
            found.append((pid, entry[:-4]))
    return found
