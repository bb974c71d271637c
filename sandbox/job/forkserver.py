"""Fork-server: a fresh interpreter (started by exec) that preloads Taichi, then forks one child per job.

It never holds threads, GPU state or Ray state, so forking it is safe. It has no socket path and no
listening socket: the supervisor talks to it over a socketpair it inherited, so only the supervisor
can reach it (a job cannot find or connect to anything). Its stdio is /dev/null: jobs get only their
own pipes. Data format on the control socket (supervisor → server), each message a kind byte, a
4-byte big-endian length and that many bytes of JSON:
    PLAN (per job): ChildPlan JSON, with SCM_RIGHTS fds [stdout, stderr, channel, reply] attached to
             its first bytes; LEASE: {"job_id", "pid", "deadline"}, no fds (sandbox.job.backstop);
             a message of another kind is skipped whole.
    on `reply` (server → supervisor, per job): "pid <n> <helpers>\n" once forked (helpers: see
             sandbox.watch.tree.JobTree); "killed <wall_time|lease> <seconds since the fork>\n" when
             the server ended the job itself (sandbox.job.backstop); then "exit <status> <utime>
             <stime> <maxrss_kib>\n" when reaped.
As root, the server is the relay of isolated jobs (sandbox.job.namespaces): it forks each as PID 1 of a
new PID namespace and answers with the status its init reports on a pipe.
Requests are read without blocking and buffered, so the server never stalls reaping or watching its
supervisor. It is a child subreaper and reaps everything. It enforces each job's wall_time backstop
and cluster lease itself (sandbox.job.backstop): past either it kills that job and appends an
`enforced` record to the audit log, since its supervisor may never come back. When the control
socket closes (the supervisor died or closed the launcher) it SIGKILLs every job's process group and
every descendant, then exits; jobs also have PR_SET_PDEATHSIG(SIGKILL) on the server. Pickle is not used.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import selectors
import signal
import socket
import struct
import sys
import time

from . import backstop, child, mounts, namespaces, syscalls

PRELOAD = ("taichi", "numpy", "psutil")  # psutil: for `_shut_down`, which its supervisor waits for
MAX_PLAN_BYTES = 1 << 22
HEADER = struct.Struct("!cI")  # kind, length
PLAN, LEASE = b"P", b"L"
FDS_PER_REQUEST = 4  # of a PLAN: stdout, stderr, channel, reply socket
OOM_SCORE_ADJ = -800  # protected from the OOM killer, a little less than the service; jobs raise theirs


def encode_request(plan_json: bytes) -> bytes:
    """The request bytes for one plan (its fds travel with them)."""
    return HEADER.pack(PLAN, len(plan_json)) + plan_json


def encode_lease(job_id: str, pid: int, deadline: float | None) -> bytes:
    """The message that sets (absolute CLOCK_MONOTONIC seconds), extends or clears (None) the
    lease deadline of the job `job_id` whose first process is `pid`."""
    payload = json.dumps({"job_id": job_id, "pid": pid, "deadline": deadline}).encode()
    return HEADER.pack(LEASE, len(payload)) + payload


class Requests:
    """Reassembles messages from a non-blocking control socket: bytes and descriptors arrive in
    pieces; `feed()` returns every message completed so far as (kind, JSON, fds): a PLAN with its
    FDS_PER_REQUEST fds, a LEASE with none; other kinds are dropped."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.fds: list[int] = []

    def feed(self, data: bytes, fds: list[int]) -> list[tuple[bytes, bytes, list[int]]]:
        self.buffer += data
        self.fds += fds
        done = []
        while len(self.buffer) >= HEADER.size:
            kind, size = HEADER.unpack_from(self.buffer)
            if size > MAX_PLAN_BYTES:
                raise ConnectionError("message too large")
            wanted = FDS_PER_REQUEST if kind == PLAN else 0
            if len(self.buffer) < HEADER.size + size or len(self.fds) < wanted:
                break
            payload = bytes(self.buffer[HEADER.size:HEADER.size + size])
            del self.buffer[:HEADER.size + size]
            if kind in (PLAN, LEASE):
                done.append((kind, payload, self.fds[:wanted]))
            del self.fds[:wanted]
        return done


# Where a forked job finds its channel, the fresh network namespace the server had ready, and the
# pipe on which, as the init of the PID namespace the server made for it, it reports the job's status.
CHANNEL_TARGET, NETNS_TARGET, STATUS_TARGET = 3, 4, 5


def _become_job(payload: bytes, fds: list[int], keep_closed: list[int], netns: int | None,
                status: int | None) -> None:
    """In the forked child: wire stdio, drop the server's descriptors, run the job. Never returns."""
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        for fd in keep_closed:
            os.close(fd)
        # out of the way of the descriptors moved to 0-5 below
        extra = {target: fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
                 for target, fd in ((NETNS_TARGET, netns), (STATUS_TARGET, status)) if fd is not None}
        stdout_fd, stderr_fd, channel_fd, _reply = fds
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        os.dup2(channel_fd, CHANNEL_TARGET)
        for target in (NETNS_TARGET, STATUS_TARGET):
            if target in extra:
                os.dup2(extra[target], target)
            else:
                os.closerange(target, target + 1)
        os.closerange(STATUS_TARGET + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=True)
        plan = child.ChildPlan.model_validate_json(payload)
        plan.parent_pid = os.getppid()
        plan.netns_fd = NETNS_TARGET if netns is not None else None
        plan.status_fd = STATUS_TARGET if status is not None else None
        child.execute(plan, CHANNEL_TARGET)
    finally:
        os._exit(72)


def _fork_job(payload: bytes, fds: list[int], keep_closed: list[int], netns: int | None,
              own_pidns: int | None) -> tuple[int, int | None, int]:
    """Fork the job's first process: (its pid, the read end of its status pipe or None, how many
    sandbox processes stand above the job). For an isolated job, where the server may (root,
    `own_pidns` open), the child is born as PID 1 of a new PID namespace and the server itself is
    the relay (sandbox.job.namespaces): one process fewer to fork, and to tear down, than a relay."""
    isolate = bool(json.loads(payload).get("isolate"))
    status_r = status_w = None
    if isolate and own_pidns is not None:
        status_r, status_w = os.pipe()
        namespaces.unshare(namespaces.CLONE_NEWPID)  # only the next child goes there
    try:
        pid = os.fork()
        if pid == 0:
            _become_job(payload, fds, [*keep_closed, *(fd for fd in (own_pidns, status_r) if fd is not None)],
                        netns, status_w)
    finally:
        if status_r is not None:
            namespaces.setns(own_pidns, namespaces.CLONE_NEWPID)  # our later children are ours again
    if status_w is not None:
        os.close(status_w)
        return pid, status_r, 1
    return pid, None, namespaces.HELPERS if isolate else 0


def detach(pid_fd: int) -> None:
    """Leave the starter's process tree (fork, the parent exits) and report our pid on `pid_fd`.

    Whoever kills the supervisor's direct children at once (Ray's force-cancel does) then cannot
    kill the server before it has killed its jobs: the server sees the control socket close and
    cleans up.
    """
    if os.fork() > 0:
        os._exit(0)
    os.write(pid_fd, f"{os.getpid()}\n".encode())
    os.close(pid_fd)


def serve(control_fd: int, audit: str | None = None) -> None:
    """Fork a job per request until the control socket closes. `audit`: the supervisor's audit log."""
    child._prctl(child.PR_SET_CHILD_SUBREAPER, 1)
    child.set_oom_score_adj(OOM_SCORE_ADJ)  # without CAP_SYS_RESOURCE it stays as inherited
    for name in PRELOAD:
        __import__(name)
    syscalls.prepare()  # each job only loads the filter
    control = socket.socket(fileno=control_fd)
    control.setblocking(False)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(control, selectors.EVENT_READ, "control")
    sel.register(wake_r, selectors.EVENT_READ, "sigchld")
    jobs: dict[int, socket.socket] = {}
    running: dict[int, tuple[str, str]] = {}  # each running job's id and directory, for `_shut_down`
    requests = Requests()
    spare_netns = namespaces.fresh_netns()
    netns_pool = spare_netns is not None  # root: keep one ready; else jobs make their own (or none)
    # root: relay here (what ForkServerLauncher.helpers counts on; without a network namespace,
    # relay and init are both the job's, as with the exec launcher)
    own_pidns = os.open("/proc/self/ns/pid", os.O_RDONLY) if netns_pool and os.geteuid() == 0 else None
    statuses: dict[int, int] = {}  # the status pipe of each job whose init is our child
    deadlines = backstop.Deadlines()
    while True:
        for key, _ in sel.select(deadlines.timeout(time.monotonic())):
            if key.data == "sigchld":
                os.read(wake_r, 4096)
                _reap(jobs, statuses)
                continue
            try:
                data, fds, _, _ = socket.recv_fds(control, 1 << 16, 64)
            except BlockingIOError:
                continue
            except OSError:
                data, fds = b"", []
            if not data:  # the supervisor is gone
                _shut_down(jobs, running, audit, 0)
            try:
                ready = requests.feed(data, fds)
            except ConnectionError:  # only the supervisor writes here: a broken request is fatal
                _shut_down(jobs, running, audit, 1)
            for kind, payload, job_fds in ready:
                if kind == LEASE:
                    deadlines.lease(payload)
                    continue
                reply = socket.socket(fileno=job_fds[3])
                reply.setblocking(False)
                forked = time.monotonic()
                pid, status_r, helpers = _fork_job(payload, job_fds, [
                    control_fd, wake_r, wake_w, *requests.fds, *(c.fileno() for c in jobs.values()),
                    *statuses.values()], spare_netns, own_pidns)
                for fd in [*job_fds[:3], *([spare_netns] if spare_netns is not None else [])]:
                    os.close(fd)
                jobs[pid] = reply
                if status_r is not None:
                    statuses[pid] = status_r
                plan = json.loads(payload)
                running[pid] = (plan["job_id"], os.path.dirname(plan["workdir"]))
                deadlines.add(pid, plan, forked)
                _reply(reply, f"pid {pid} {helpers}\n")
                spare_netns = None
        _reap(jobs, statuses)
        for pid in [p for p in running if p not in jobs]:
            del running[pid]  # ended: its supervisor removes the directory and records the verdict
            deadlines.forget(pid)
        for pid, job_id, kind, after in deadlines.due(time.monotonic()):
            _enforce(pid, job_id, kind, after, jobs[pid], audit)
        if netns_pool and spare_netns is None:  # between requests: the next job enters it, not creates one
            spare_netns = namespaces.fresh_netns()


def _enforce(pid: int, job_id: str, kind: str, after: float, reply: socket.socket, audit: str | None) -> None:
    """A deadline of the job passed (sandbox.job.backstop): record it (its supervisor may never
    come back), kill the job, tell its supervisor why before the exit line."""
    past = "its wall_time" if kind == "wall_time" else "the end of its cluster lease"
    reason = (f"the fork-server killed the job {after:.1f} s after its start, past {past}, grace and "
              f"{backstop.BACKSTOP_SLACK:g} s: its supervisor did not end it in time")
    if audit:
        from ..core.audit import AuditLog
        try:
            AuditLog(audit).append([{"type": "enforced", "job_id": job_id, "ts": time.time(), "by": "fork-server",
                                     "enforced": kind, "reason": reason}])
        except OSError:
            pass
    backstop.kill_job(pid)
    _reply(reply, backstop.DUE_LINE.format(kind=kind, after=after))


def _shut_down(jobs: dict[int, socket.socket], running: dict[int, tuple[str, str]], audit: str | None,
               code: int) -> None:
    """The supervisor is gone: do what it cannot (append an `aborted` record per running job to its
    audit log, before the job is gone), SIGKILL every job group and every descendant (we are their
    subreaper), unmount and remove those jobs' directories (a job's own filesystem image goes with
    its mount: nothing to walk) and our own, exit."""
    import psutil

    from .safefs import remove_tree
    if audit and running:
        from ..core.audit import AuditLog
        try:
            AuditLog(audit).append([{"type": "aborted", "job_id": job_id, "ts": time.time(), "by": "fork-server",
                                     "reason": "its supervisor ended first; the fork-server killed the job"}
                                    for job_id, _ in running.values()])
        except OSError:
            pass
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
    for _, path in running.values():
        try:
            mounts.umount(path)
        except OSError:
            pass  # not a mount point: the job had no image
    for path in (*(d for _, d in running.values()), os.getcwd()):
        remove_tree(path)
    os._exit(code)


def _reply(conn: socket.socket, line: str) -> None:
    try:
        conn.send(line.encode())  # a few bytes into an empty buffer: never blocks, never partial
    except OSError:
        pass


def _reap(jobs: dict[int, socket.socket], statuses: dict[int, int]) -> None:
    """Reap every ended child; answer each job's supervisor with its exit (for an init of ours, the
    job's status as the init reported it: see namespaces.relayed_status)."""
    while True:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        status_r = statuses.pop(pid, None)
        if status_r is not None:
            os.set_blocking(status_r, False)
            try:
                report = os.read(status_r, 64)
            except BlockingIOError:
                report = b""
            os.close(status_r)
            status = namespaces.relayed_status(report, status)
        conn = jobs.pop(pid, None)
        if conn is not None:
            _reply(conn, f"exit {status} {usage.ru_utime} {usage.ru_stime} {usage.ru_maxrss}\n")
            conn.close()


if __name__ == "__main__":
    control_arg, pid_out = map(int, sys.argv[1:3])
    detach(pid_out)
    serve(control_arg, sys.argv[3] if len(sys.argv) > 3 else None)
