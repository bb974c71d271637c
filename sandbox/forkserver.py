"""Fork-server: a fresh interpreter (started by exec) that preloads Taichi, then forks one child per job.

It never holds threads, GPU state or Ray state, so forking it is safe. Protocol, per job, on its own
connection to the server's Unix socket (supervisor → server):
    request: 4-byte length + ChildPlan JSON, with SCM_RIGHTS fds [stdout, stderr, channel]
    reply:   "pid <n>\\n" once forked, then "exit <status> <utime> <stime> <maxrss_kib>\\n" when reaped.
The server is a child subreaper and reaps everything. When the supervisor's lifeline pipe closes
(the supervisor died) it SIGKILLs every job's process group and every descendant, then exits; jobs also have
PR_SET_PDEATHSIG(SIGKILL) on the server.
"""

from __future__ import annotations

import os
import resource
import selectors
import signal
import socket
import struct
import sys

from . import child

PRELOAD = ("taichi", "numpy")
MAX_PLAN_BYTES = 1 << 22


def _recv_request(conn: socket.socket, fds: list[int]) -> bytes:
    """Read one request; received descriptors are put in `fds` at once, so a bad request's can be
    closed by the caller."""
    header, received, _, _ = socket.recv_fds(conn, 4, 3)
    fds.extend(received)
    if len(header) != 4:
        raise ConnectionError("short request header")
    size = struct.unpack("!I", header)[0]
    if size > MAX_PLAN_BYTES:
        raise ConnectionError("plan too large")
    payload = bytearray()
    while len(payload) < size:
        chunk = conn.recv(size - len(payload))
        if not chunk:
            raise ConnectionError("short request")
        payload += chunk
    return bytes(payload)


def _become_job(payload: bytes, fds: list[int], keep_closed: list[int]) -> None:
    """In the forked child: wire stdio, drop the server's descriptors, run the job. Never returns."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for fd in keep_closed:
            os.close(fd)
        stdout_fd, stderr_fd, channel_fd = fds
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        channel_target = 3
        os.dup2(channel_fd, channel_target)
        os.closerange(channel_target + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True)
        plan = child.ChildPlan.model_validate_json(payload)
        plan.parent_pid = os.getppid()
        child.execute(plan, channel_target)
    finally:
        os._exit(72)


def detach(pid_fd: int) -> None:
    """Leave the starter's process tree (fork, the parent exits) and report our pid on `pid_fd`.

    Whoever kills the supervisor's direct children at once (Ray's force-cancel does) then cannot
    kill the server before it has killed its jobs: the server sees the lifeline close and cleans up.
    """
    if os.fork() > 0:
        os._exit(0)
    os.write(pid_fd, f"{os.getpid()}\n".encode())
    os.close(pid_fd)


def serve(listen_fd: int, lifeline_fd: int) -> None:
    """Accept job requests until the lifeline closes."""
    child._prctl(child.PR_SET_CHILD_SUBREAPER, 1)
    for name in PRELOAD:
        __import__(name)
    listener = socket.socket(fileno=listen_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(lifeline_fd, selectors.EVENT_READ, "lifeline")
    sel.register(wake_r, selectors.EVENT_READ, "sigchld")
    jobs: dict[int, socket.socket] = {}
    while True:
        for key, _ in sel.select():
            if key.data == "lifeline":
                _kill_everything(jobs)
                os._exit(0)
            if key.data == "sigchld":
                os.read(wake_r, 4096)
                _reap(jobs)
            if key.data == "accept":
                conn, _ = listener.accept()
                fds: list[int] = []
                try:
                    payload = _recv_request(conn, fds)
                except (OSError, ConnectionError):
                    for fd in fds:
                        os.close(fd)
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    _become_job(payload, fds, [listen_fd, lifeline_fd, wake_r, wake_w, conn.fileno(),
                                               *(c.fileno() for c in jobs.values())])
                for fd in fds:
                    os.close(fd)
                jobs[pid] = conn
                _reply(conn, f"pid {pid}\n")
                _reap(jobs)


def _kill_everything(jobs: dict[int, socket.socket]) -> None:
    """The supervisor is gone: SIGKILL every job group and every descendant (we are their subreaper)."""
    import psutil
    for pid in jobs:
        try:
            os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
    for proc in psutil.Process().children(recursive=True):
        try:
            proc.kill()
        except psutil.Error:
            pass


def _reply(conn: socket.socket, line: str) -> None:
    try:
        conn.sendall(line.encode())
    except OSError:
        pass


def _reap(jobs: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = jobs.pop(pid, None)
        if conn is not None:
            _reply(conn, f"exit {status} {usage.ru_utime} {usage.ru_stime} {usage.ru_maxrss}\n")
            conn.close()


if __name__ == "__main__":
    listen, lifeline, pid_out = map(int, sys.argv[1:4])
    detach(pid_out)
    serve(listen, lifeline)
