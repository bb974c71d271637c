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
"<wait status>\n" (`init_report`, `relayed_status`). Pickle is not used.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import signal
import socket
import struct
import sys
import tempfile

from .cgroup.host import CGROUP_ROOT
from .cgroup.view import joined_hierarchies
from .interpreter import PACKAGE, ROOT_CWD, base_env, python

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWUSER, CLONE_NEWCGROUP = 0x20000000, 0x40000000, 0x10000000, 0x02000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 0x400, 0x800, 0x1000, 0x2000, 0x4000
MS_PRIVATE, MS_RELATIME, ST_RELATIME = 1 << 18, 1 << 21, 0x1000
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8  # umount2(2): a symlink at the target is not followed (the path may be a tenant's dir)
PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 4, 38, 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
SIOCSIFFLAGS, IFF_UP = 0x8914, 0x1
HOSTNAME = b"taichi-sandbox"
TMP_DIRS = ("/tmp", "/var/tmp")  # world-writable: private to each job, or files outlive it and other tenants read them
HELPERS = 2  # the relay and the init: processes in the job's cgroup that are not the job's

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), "setns")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


def umount(target: str, flags: int = MNT_DETACH | UMOUNT_NOFOLLOW) -> None:
    """umount2(2): by default detached at once, the filesystem released when nothing uses it, and
    never through a symlink at `target`."""
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


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
    mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, _shared_tmpfs(tmpfs_bytes))
    _check(_libc.sethostname(HOSTNAME, len(HOSTNAME)), "sethostname")
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


def private_cgroups(join_files: list[str]) -> None:
    """Show the job at /sys/fs/cgroup only its own cgroup, read-only: a fresh mount of each
    hierarchy it joined (in its cgroup namespace, the job's cgroup is the root: its own limits are
    readable where a container reads them) on an empty tmpfs that hides the host's hierarchies,
    other jobs' ids and usage among them. On a unified v2 host, a fresh cgroup2 mount there."""
    if not os.path.isdir(CGROUP_ROOT):
        return
    with open("/proc/self/mountinfo") as f:
        hierarchies = joined_hierarchies(f.read(), join_files)
    sealed = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    if any(place == "" for place, _, _ in hierarchies):
        mount("cgroup2", CGROUP_ROOT, "cgroup2", sealed)
        return
    stage = tempfile.mkdtemp(prefix="cgroup-", dir="/dev/shm")
    mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k")
    for place, fstype, data in hierarchies:
        os.makedirs(f"{stage}/{place}", 0o755)
        mount(fstype, f"{stage}/{place}", fstype, sealed, data)
    mount(None, stage, None, MS_BIND | MS_REMOUNT | sealed)
    mount(stage, CGROUP_ROOT, None, MS_MOVE)
    os.rmdir(stage)


def interpreter_paths() -> list[str]:
    """What the job's Python needs to read: its prefixes, every import path and the directory this
    package is imported from (its site-packages, or the checkout of an editable install, whose
    modules the functions a caller ships may come from)."""
    return [sys.base_prefix, sys.prefix, *(p for p in sys.path if p), os.path.dirname(PACKAGE)]


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
        _cover(top, inside, "mode=0755,size=1m")


def private_tmp(paths: list[tuple[str, bool]], size: int | None) -> None:
    """Give the job its own empty /tmp and /var/tmp (systemd's PrivateTmp): tmpfs, mode 1777, of
    `size` bytes at most, charged to the job's memory cgroup and gone with its mount namespace.
    Those of `paths` that live there (the job's work dir, perhaps its kernel file, cache or
    interpreter) are bound back at the same place (read-only unless writable)."""
    options = _shared_tmpfs(size)
    real = [(os.path.realpath(p), w) for p, w in paths if os.path.exists(p)]
    for top in filter(os.path.isdir, TMP_DIRS):
        _cover(top, [(p, w) for p, w in real if p.startswith(top + "/")], options)


def read_only_rest(writable: list[str]) -> None:
    """Remount read-only, in this mount namespace, every mount but /proc, the job's tmpfs (/tmp,
    /var/tmp, /dev/shm) and the `writable` paths bound for it. Device nodes stay usable (a
    read-only mount does not stop writes to a device: /dev/null, /dev/nvidia*, /dev/dri)."""
    keep = {"/proc", "/dev/shm", *TMP_DIRS, *map(os.path.realpath, writable)}
    for path in keep.difference(("/proc", "/dev/shm", *TMP_DIRS)):
        mount(path, path, None, MS_BIND | MS_REC)  # a mount of its own, which stays writable
    with open("/proc/self/mountinfo") as f:
        points = [_unescape(line.split()[4]) for line in f]
    for point in dict.fromkeys(points):  # each once, parents first
        if point in keep or point.startswith("/proc/"):
            continue
        try:
            mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | _kept_flags(point))
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOENT):  # covered by a later mount: not a mount point here
                raise


def _unescape(field: str) -> str:
    """A mountinfo path: space, tab, newline and backslash are written as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _shared_tmpfs(size: int | None) -> str:
    """Mount options of a world-writable (sticky) tmpfs of at most `size` bytes."""
    return "mode=1777" + (f",size={size}" if size else "")


def _cover(top: str, inside: list[tuple[str, bool]], options: str) -> None:
    """Mount a tmpfs (`options`) over the directory `top` that holds bind mounts of the paths
    `inside` it, at the same places, read-only unless writable. Built in a staging directory in
    the job's own /dev/shm, then moved over `top` at once."""
    stage = tempfile.mkdtemp(prefix="cover-", dir="/dev/shm")
    mount("tmpfs", stage, "tmpfs", MS_NOSUID | MS_NODEV, options)
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
            mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | _kept_flags(path))
    mount(stage, top, None, MS_MOVE)
    os.rmdir(stage)


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
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")


def drop_capabilities() -> None:
    """Keep the uid, lose every capability for good (bounding set emptied, then the effective,
    permitted and inheritable sets), no new privileges."""
    _empty_bounding_set()
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    _check(_libc.capset(header, (ctypes.c_uint32 * 6)()), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def _kept_flags(path: str) -> int:
    """The mount flags of `path` a read-only remount must repeat (in a user namespace the kernel
    refuses to clear those a more privileged namespace set)."""
    flags = os.statvfs(path).f_flag
    kept = flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)  # same bits in both
    return kept | (MS_RELATIME if flags & ST_RELATIME else 0)


def drop_privileges(uid: int, gid: int) -> None:
    """Become `uid`/`gid` for good: no supplementary groups, no capabilities (the bounding set is
    emptied first, so none can come back through exec), no new privileges."""
    _empty_bounding_set()
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


def probe() -> str | None:
    """Whether this process's children can enter new namespaces: None, or why not (checked once,
    in a throwaway interpreter: the supervisor itself never unshares or forks)."""
    import subprocess
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
    return None
