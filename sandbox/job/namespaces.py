"""The job side of isolation: new PID, mount, IPC, UTS, cgroup and (optionally) network namespaces.

Three roles, each with one task (`enter()` returns only in the job):

    relay  (outside): waits for the init, then ends the way the job ended (same exit code, or the
           same signal), so the launcher's wait4 sees the job's status and, having waited for
           everything, its whole rusage. A root fork-server is the relay itself (it forks the init
           straight into a new PID namespace and reads the status pipe); otherwise the launcher's
           child unshares, forks the init and relays (`_relay`).
    init   (PID 1 inside): makes the mounts private and mounts a private /dev/shm (a relaying child
           does those two before it forks the init), then a fresh /proc, only the job's own
           cgroup at /sys/fs/cgroup (`private_cgroups`; the job has a cgroup namespace) and a
           private /tmp and /var/tmp (`private_tmp`; tmpfs charged to the job's cgroup), exposes what
           the job's uid cannot reach (`expose_paths`), optionally makes the rest read-only
           (`read_only_rest`), forks the job, reaps orphans, and when the job's process ends
           SIGKILLs everything left in the namespace (kill(-1)), reaps it, reports how many on the
           channel and writes the job's wait status to the relay.
    job    (PID 2 inside): becomes the tenant's uid (`drop_privileges`) when it has one, or drops
           its capabilities in a user namespace (`drop_capabilities`); sees only its own tree: the
           supervisor, the fork-server, other jobs and host services are not in its /proc and
           cannot be named by kill().

An init is needed because PID 1 gets no default signal actions: a SIGTERM from the supervisor would
be dropped, and orphans would never be reaped. Data format on the init → relay pipe:
"<wait status>\n" (`init_report`, `relayed_status`). Pickle is not used. The init's mounts
(`private_cgroups`, `private_tmp`, `expose_paths`, `read_only_rest`) are sandbox.job.mounts'.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import struct

from .interpreter import ROOT_CWD, base_env, python
from .mounts import (MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_REC, check, expose_paths, interpreter_paths,
                     libc, mount, private_cgroups, private_tmp, read_only_rest, shared_tmpfs)

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWUSER, CLONE_NEWCGROUP = 0x20000000, 0x40000000, 0x10000000, 0x02000000
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 4, 38, 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
SIOCSIFFLAGS, IFF_UP = 0x8914, 0x1
HOSTNAME = b"taichi-sandbox"
HELPERS = 2  # the relay and the init: processes in the job's cgroup that are not the job's


def unshare(flags: int) -> None:
    check(libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    check(libc.setns(fd, nstype), "setns")


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
        setns(own, CLONE_NEWNET)
        os.close(own)


def enter(network: str, tmpfs_bytes: int | None, channel_fd: int, on_leftovers, netns_fd: int | None = None,
          ids: tuple[int, int] | None = None, expose: list[tuple[str, bool]] = (),
          status_fd: int | None = None, read_only: bool = False, cgroup_join: list[str] = ()) -> None:
    """Move the calling (single-threaded) process's job into new namespaces. Returns only in the
    job process; the relay and the init never return. `on_leftovers(fd, count)` is called by the
    init when it had to kill processes the job left behind. `netns_fd`: a fresh network namespace
    (see `fresh_netns`) to enter instead of creating one; closed either way. `tmpfs_bytes`: the
    size of its private /dev/shm, /tmp and /var/tmp (None: the kernel's default). `expose`: (path,
    writable) pairs the job needs besides the interpreter, kept visible in its private /tmp and,
    with `ids` ((uid, gid) the job runs as), made reachable for that uid. `status_fd`: the caller
    is already PID 1 of a new PID namespace, made by its parent (the fork-server), which relays:
    it becomes the init at once and writes the job's status there (`init_report`). `read_only`:
    the rest of the filesystem becomes read-only for the job (`read_only_rest`). `cgroup_join`:
    the files by which the caller joined its job cgroup (`private_cgroups`)."""
    fresh = netns_fd is not None and network == "none"
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP  # its cgroup (joined already) is its "/"
    flags |= CLONE_NEWNET if network == "none" and not fresh else 0
    flags |= CLONE_NEWPID if status_fd is None else 0
    enter_user_namespace(flags) if os.geteuid() else unshare(flags)
    if fresh:
        setns(netns_fd, CLONE_NEWNET)
    if netns_fd is not None:
        os.close(netns_fd)
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here reaches the host
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, shared_tmpfs(tmpfs_bytes))
    check(libc.sethostname(HOSTNAME, len(HOSTNAME)), "sethostname")
    if flags & CLONE_NEWNET:
        loopback_up()
    if status_fd is None:
        status_r, status_fd = os.pipe()
        init = os.fork()
        if init > 0:
            os.close(status_fd)
            _relay(init, status_r, channel_fd)
        os.close(status_r)
        _die_with_parent()
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # shows this PID namespace only
    private_cgroups(cgroup_join)
    needed = [*((p, False) for p in interpreter_paths()), *expose]
    private_tmp(needed, tmpfs_bytes)
    if ids is not None:
        expose_paths(needed, *ids)
    if read_only:
        read_only_rest([path for path, writable in expose if writable])
    job = os.fork()
    if job == 0:
        os.close(status_fd)
        _die_with_parent()
        if ids is not None:
            drop_privileges(*ids)
        elif os.geteuid():
            drop_capabilities()  # those of its user namespace: else it could unmount its private /tmp
        return
    _init(job, status_fd, channel_fd, on_leftovers)


def enter_user_namespace(flags: int) -> None:
    """For a supervisor that is not root: unshare `flags` together with a new user namespace (created
    first, so it owns the others and this process holds every capability over them), in which this
    process's own uid and gid are mapped to themselves and to nothing else."""
    uid, gid = os.geteuid(), os.getegid()
    unshare(CLONE_NEWUSER | flags)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _empty_bounding_set() -> None:
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")


def drop_capabilities() -> None:
    """Keep the uid, lose every capability for good (bounding set emptied, then the effective,
    permitted and inheritable sets), no new privileges."""
    _empty_bounding_set()
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    check(libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def drop_privileges(uid: int, gid: int) -> None:
    """Become `uid`/`gid` for good: no supplementary groups, no capabilities (the bounding set is
    emptied first, so none can come back through exec), no new privileges."""
    _empty_bounding_set()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    # Changing ids makes a process non-dumpable, which hands its own /proc/self files to root; it
    # is the job's own now (no core dumps: RLIMIT_CORE is 0).
    check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def _die_with_parent() -> None:
    check(libc.prctl(1, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _init(job: int, status_fd: int, channel_fd: int, on_leftovers) -> None:
    """PID 1: reap until the job's process ends, kill and reap the rest, report, exit."""
    _close(0, 1, 2)  # the job's stdio is the job's; the init keeps the channel only to report leftovers
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
        on_leftovers(channel_fd, leftovers)
    os.write(status_fd, init_report(status))
    os._exit(0)


def init_report(status: int) -> bytes:
    """What the init writes to its relay: the job's wait status, one line. `relayed_status` reads it."""
    return f"{status}\n".encode()


def relayed_status(report: bytes, init_status: int) -> int:
    """The job's wait status from the init's report, or the init's own when it reported nothing
    (killed first: then the job was killed with it)."""
    line = report.split(b"\n", 1)[0]
    return int(line) if report.endswith(b"\n") and line.isdigit() else init_status


def _running(pid: str) -> bool:
    """Not a zombie (exited processes the init has not reaped yet are not leftovers)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


def _relay(init: int, status_r: int, channel_fd: int) -> None:
    """Outside: wait for the init, then end as the job ended (same exit code, or the same signal),
    so the launcher's wait4 sees the job's status and, having waited for everything, its rusage."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # the job decides; the relay only mirrors it
    _close(0, 1, 2, channel_fd)  # the job's stdio and channel
    _, init_status = os.waitpid(init, 0)
    status = relayed_status(os.read(status_r, 64), init_status)
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
uid, gid, flags = os.geteuid(), os.getegid(), %d
def fail(what):
    raise SystemExit(what + ": " + os.strerror(ctypes.get_errno()))
if libc.unshare(flags | (%d if uid else 0)) != 0:
    fail("unshare" + (" with a user namespace" if uid else ""))
if uid:
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
if libc.mount(None, b"/", None, ctypes.c_ulong(%d), None) != 0:
    fail("making the mounts private")
pid = os.fork()
if pid == 0:
    os._exit(0 if libc.mount(b"proc", b"/proc", b"proc", ctypes.c_ulong(0), None) == 0 else ctypes.get_errno())
status = os.waitpid(pid, 0)[1]
if os.waitstatus_to_exitcode(status):
    raise SystemExit("mounting /proc in a new PID namespace: " + os.strerror(os.waitstatus_to_exitcode(status)))
"""


# What decides whether a process of ours can make namespaces, besides transient failures: the
# user-namespace sysctls (all of /proc/sys/user, and these).
USERNS_SYSCTLS = ("/proc/sys/kernel/unprivileged_userns_clone", "/proc/sys/kernel/apparmor_restrict_unprivileged_userns")
_passed: set[tuple] = set()  # the `_conditions()` under which `probe()` passed in this process


def _conditions() -> tuple:
    """euid, our user namespace and the sysctls, read in well under a millisecond."""
    values = []
    for path in (*(f"/proc/sys/user/{n}" for n in sorted(os.listdir("/proc/sys/user"))), *USERNS_SYSCTLS):
        try:
            with open(path, "rb") as f:
                values.append(f.read())
        except OSError:
            values.append(None)
    return os.geteuid(), os.readlink("/proc/self/ns/user"), tuple(values)


def probe() -> str | None:
    """Whether this process's children can enter new namespaces: None, or why not (checked in a
    throwaway interpreter: the supervisor itself never unshares or forks). A pass is remembered
    while `_conditions()` stay the same (a warm server's workers inherit it)."""
    import subprocess
    try:
        conditions = _conditions()
    except OSError:
        conditions = None
    if conditions is not None and conditions in _passed:
        return None
    flags = CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNET | CLONE_NEWCGROUP
    try:
        done = subprocess.run(python("-S", "-c", PROBE % (flags, CLONE_NEWUSER, MS_REC | MS_PRIVATE)),
                              capture_output=True, text=True, timeout=30, env=base_env(), cwd=ROOT_CWD,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"namespace probe failed: {err}"
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["unknown error"])[-1]
        who = "as root" if os.geteuid() == 0 else "without root, in a user namespace (unprivileged user namespaces " \
            "may be disabled: user.max_user_namespaces, kernel.unprivileged_userns_clone)"
        return f"cannot create namespaces here {who}: {why}"
    if conditions is not None:
        _passed.add(conditions)
    return None
