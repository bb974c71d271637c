"""The job's mount namespace: what its init mounts before it forks the job (sandbox.job.namespaces).

- `private_cgroups`: only the job's own cgroup at /sys/fs/cgroup, read-only.
- `private_tmp`: its own /tmp and /var/tmp (tmpfs charged to the job's cgroup), the paths it needs
  that live there bound back.
- `expose_paths`: what the job's uid cannot reach (a 0700 /root holding the interpreter) covered,
  in this namespace only, by a tmpfs holding read-only binds of just what it needs.
- `read_only_rest`: every other mount remounted read-only.
These four change nothing on the host: they mount in the caller's own (private) mount namespace.
Also `mount` and `umount` themselves, with which the job's filesystem image is mounted and
unmounted on the host (sandbox.job.loop, sandbox.job.disk, the fork-server).
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import tempfile

from .cgroup.host import CGROUP_ROOT, unescape_mountinfo
from .cgroup.view import joined_hierarchies
from .interpreter import PACKAGE

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 0x1, 0x2, 0x4, 0x8, 0x20
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 0x400, 0x800, 0x1000, 0x2000, 0x4000
MS_PRIVATE, MS_RELATIME, ST_RELATIME = 1 << 18, 1 << 21, 0x1000
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8  # umount2(2): a symlink at the target is not followed (the path may be a tenant's dir)
TMP_DIRS = ("/tmp", "/var/tmp")  # world-writable: private to each job, or files outlive it and other tenants read them

libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    """Raise OSError (errno and `what`) when a libc call returned non-zero."""
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def umount(target: str, flags: int = MNT_DETACH | UMOUNT_NOFOLLOW) -> None:
    """umount2(2): by default detached at once, the filesystem released when nothing uses it, and
    never through a symlink at `target`."""
    check(libc.umount2(target.encode(), flags), f"umount {target}")


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
    options = shared_tmpfs(size)
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
        points = [unescape_mountinfo(line.split()[4]) for line in f]
    for point in dict.fromkeys(points):  # each once, parents first
        if point in keep or point.startswith("/proc/"):
            continue
        try:
            mount(None, point, None, MS_BIND | MS_REMOUNT | MS_RDONLY | _kept_flags(point))
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOENT):  # covered by a later mount: not a mount point here
                raise


def shared_tmpfs(size: int | None) -> str:
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


def _kept_flags(path: str) -> int:
    """The mount flags of `path` a read-only remount must repeat (in a user namespace the kernel
    refuses to clear those a more privileged namespace set)."""
    flags = os.statvfs(path).f_flag
    kept = flags & (MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)  # same bits in both
    return kept | (MS_RELATIME if flags & ST_RELATIME else 0)
