"""The job side of isolation: new PID, mount, IPC, UTS and (optionally) network namespaces.

Three processes, each with one task (`enter()` returns only in the third):

    relay  (the launcher's child, outside): unshares, makes the mounts private, mounts a private
           /dev/shm, forks the init, waits for it, then ends the way the job ended (same exit
           code, or the same signal), so the launcher's wait4 sees the job's status and, having
           waited for everything, its whole rusage.
    init   (PID 1 inside): mounts a fresh /proc, exposes what the job's uid cannot reach (see
           `expose_paths`), forks the job, reaps orphans, and when the job's process ends SIGKILLs
           everything left in the namespace (kill(-1)), reaps it, and tells the relay the job's
           wait status and how many it killed.
    job    (PID 2 inside): becomes the tenant's uid (`drop_privileges`) when it has one; sees only
           its own tree: the supervisor, the fork-server, other jobs and host services are not in
           its /proc and cannot be named by kill().

An init is needed because PID 1 gets no default signal actions: a SIGTERM from the supervisor would
be dropped, and orphans would never be reaped. Data format on the init → relay pipe:
"<wait status> <leftovers>\\n". Pickle is not used.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import struct
import sys
import tempfile

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 0x1000, 0x2000, 0x4000, 1 << 18
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 4, 38, 24
SIOCSIFFLAGS, IFF_UP = 0x8914, 0x1
HOSTNAME = b"taichi-sandbox"
HELPERS = 2  # the relay and the init: processes in the job's cgroup that are not the job's

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def loopback_up() -> None:
    """A new network namespace has only `lo`, and it is down."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", IFF_UP))


def fresh_netns() -> int | None:
    """A descriptor of a new network namespace with loopback up, made by a single-threaded root
    process that stays in its own (the fork-server keeps one ready: creating a network namespace
    costs ~7 ms, entering one almost nothing). None where this process cannot."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        unshare(CLONE_NEWNET)
    except OSError:
        os.close(own)
        return None
    try:
        loopback_up()
        return os.open("/proc/self/ns/net", os.O_RDONLY)
    finally:
        _check(_libc.setns(own, CLONE_NEWNET), "setns back")
        os.close(own)


def enter(network: str, shm_bytes: int | None, channel_fd: int, on_leftovers, netns_fd: int | None = None,
          ids: tuple[int, int] | None = None, expose: list[tuple[str, bool]] = ()) -> None:
    """Move the calling (single-threaded, root) process's job into new namespaces. Returns only in
    the job process; the relay and the init never return. `on_leftovers(fd, count)` is called by
    the relay when the init had to kill processes the job left behind. `netns_fd`: a fresh network
    namespace (see `fresh_netns`) to enter instead of creating one; closed either way. `ids`:
    (uid, gid) the job runs as, with `expose` ((path, writable) pairs, the interpreter added) made
    reachable for it (see `expose_paths`)."""
    fresh = netns_fd is not None and network == "none"
    new_net = CLONE_NEWNET if network == "none" and not fresh else 0
    unshare(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | new_net)
    if fresh:
        _check(_libc.setns(netns_fd, CLONE_NEWNET), "setns")
    if netns_fd is not None:
        os.close(netns_fd)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here reaches the host
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
          "mode=1777" + (f",size={shm_bytes}" if shm_bytes else ""))
    _check(_libc.sethostname(HOSTNAME, len(HOSTNAME)), "sethostname")
    if network == "none" and not fresh:
        loopback_up()
    status_r, status_w = os.pipe()
    init = os.fork()
    if init > 0:
        os.close(status_w)
        _relay(init, status_r, channel_fd, on_leftovers)
    os.close(status_r)
    _die_with_parent()
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # shows this PID namespace only
    if ids is not None:
        expose_paths([*((p, False) for p in interpreter_paths()), *expose], *ids)
    job = os.fork()
    if job == 0:
        os.close(status_w)
        _die_with_parent()
        if ids is not None:
            drop_privileges(*ids)
        return
    _init(job, status_w, channel_fd)


def interpreter_paths() -> list[str]:
    """What the job's Python needs to read: its prefixes and every import path."""
    return [sys.base_prefix, sys.prefix, *(p for p in sys.path if p)]


def permits(path: str, uid: int, gid: int, other_bit: int) -> bool:
    """Whether `uid`/`gid`, with no supplementary groups (jobs drop them), hold the permission whose
    bit for others is `other_bit` (0o004 read, 0o001 pass through) on `path`."""
    st = os.stat(path)
    bit = other_bit << 6 if st.st_uid == uid else other_bit << 3 if st.st_gid == gid else other_bit
    return bool(st.st_mode & bit)


def _first_blocked(path: str, uid: int, gid: int) -> str | None:
    """The outermost directory above `path` that `uid`/`gid` cannot pass."""
    current = ""
    for part in path.strip("/").split("/")[:-1]:
        current += "/" + part
        if not permits(current, uid, gid, 0o001):
            return current
    return None


def expose_paths(paths: list[tuple[str, bool]], uid: int, gid: int) -> None:
    """Make each path reachable for `uid` without changing the host: every directory it cannot
    pass (such as a 0700 /root holding the interpreter) is covered, in this mount namespace, by a
    tmpfs that holds only bind mounts of the paths needed under it (read-only unless writable)."""
    covered: dict[str, list[tuple[str, bool]]] = {}
    for path, writable in paths:
        path = os.path.realpath(path)
        top = _first_blocked(path, uid, gid) if os.path.exists(path) else None
        if top is not None:
            covered.setdefault(top, []).append((path, writable))
    for top, inside in covered.items():
        stage = tempfile.mkdtemp(prefix="expose-", dir="/dev/shm")  # the job's own /dev/shm, for a moment
        mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
        bound: list[str] = []
        for path, writable in sorted(inside, key=lambda item: len(item[0])):
            if any(path == outer or path.startswith(outer + "/") for outer in bound):
                continue  # reachable through a path bound already (with that path's access)
            bound.append(path)
            target = stage + path[len(top):]
            if os.path.isdir(path):
                os.makedirs(target, 0o755, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
                open(target, "a").close()
            mount(path, target, None, MS_BIND | MS_REC)
            if not writable:
                mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        mount(stage, top, None, MS_MOVE)
        os.rmdir(stage)


def drop_privileges(uid: int, gid: int) -> None:
    """Become `uid`/`gid` for good: no supplementary groups, no capabilities (the bounding set is
    emptied first, so none can come back through exec), no new privileges."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    # Changing ids makes a process non-dumpable, which hands its own /proc/self files to root; it
    # is the job's own now (no core dumps: RLIMIT_CORE is 0).
    _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def _die_with_parent() -> None:
    _check(_libc.prctl(1, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _init(job: int, status_w: int, channel_fd: int) -> None:
    """PID 1: reap until the job's process ends, kill and reap the rest, report, exit."""
    _close(0, 1, 2, channel_fd)  # the job's stdio and channel are the job's; the init holds none of them
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # cannot happen while the job lives; be safe
            status = 0
            break
        if pid == job:
            break
    leftovers = sum(1 for name in os.listdir("/proc") if name.isdigit() and name != "1" and _running(name))
    if leftovers:
        os.kill(-1, signal.SIGKILL)  # every process of this namespace but us, atomically
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
    os.write(status_w, f"{status} {leftovers}\n".encode())
    os._exit(0)


def _running(pid: str) -> bool:
    """Not a zombie (exited processes the init has not reaped yet are not leftovers)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def _relay(init: int, status_r: int, channel_fd: int, on_leftovers) -> None:
    """Outside: wait for the init, then end as the job ended."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the job decides; the relay only mirrors it
    _close(0, 1, 2)
    _, init_status = os.waitpid(init, 0)
    report = os.read(status_r, 64).split()
    status = int(report[0]) if len(report) == 2 else init_status
    if len(report) == 2 and int(report[1]):
        on_leftovers(channel_fd, int(report[1]))
    _close(channel_fd)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # those cannot be caught, so are not ignored
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default action is not to die
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 1)


PROBE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(%d) != 0:
    raise SystemExit(os.strerror(ctypes.get_errno()))
"""


def probe() -> str | None:
    """Whether this process's children can enter new namespaces: None, or why not (checked once,
    in a throwaway interpreter: the supervisor itself never unshares or forks)."""
    import subprocess
    import sys
    flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET
    try:
        done = subprocess.run([sys.executable, "-S", "-c", PROBE % flags], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"namespace probe failed: {err}"
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"cannot create namespaces here ({why}): not root and no CAP_SYS_ADMIN"
    return None
