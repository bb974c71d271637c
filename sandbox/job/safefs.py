"""File-system primitives for code that runs as root on what a job or a tenant controls: nothing
here resolves a path a tenant can change by name.

- Below a directory descriptor (`open_beneath`, `makedirs_beneath`, `create_beneath`) no symlink is
  followed at any component and no `..` is accepted: `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
  RESOLVE_NO_MAGICLINKS)` where the kernel has it (Linux 5.6+), else a walk that opens each component
  with `O_NOFOLLOW | O_DIRECTORY` from the one before. Files are created with `O_EXCL`: never
  over an existing name.
- `open_as` opens a caller's path with a tenant's file-system uid and gid and no groups, so the
  kernel itself answers "could the tenant open it?" (every directory above, the file's bits, ACLs).
- `remove_tree` removes a tree a job built: iteratively (any depth), one directory descriptor at a
  time, never following a symlink, never entering a mount point (`RESOLVE_NO_XDEV`; without
  openat2 only the mount points of other file systems are seen), bounded in time; it returns what it
  could not remove instead of raising.
- `data_ranges` lists where an open file holds data (SEEK_DATA/SEEK_HOLE), so a copy skips its holes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..core.values import valid_text
from .mounts import check, libc

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
REMOVE_SECONDS = 10.0  # of root's time per tree; what is left then is reported
RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH = 0x01, 0x02, 0x04, 0x08
_SYS_OPENAT2 = 437  # the same number on every architecture (added after the tables were unified)
# setfsuid, setfsgid, setgroups: raw system calls act on the calling thread only (glibc's setgroups
# changes every thread of the process).
_SYSCALLS = {"x86_64": (122, 123, 116), "aarch64": (151, 152, 159)}


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _parts(rel: str) -> list[str]:
    """The components of a relative path; OSError(EXDEV) for an absolute one or one with '..'."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if rel.startswith("/") or ".." in parts:
        raise OSError(errno.EXDEV, "path leaves its directory", rel)
    return parts


def _split(rel: str) -> tuple[str, str]:
    """(the directories, the last name) of a relative path to a file."""
    parts = _parts(rel)
    if not parts:
        raise OSError(errno.EINVAL, "no file name", rel)
    return "/".join(parts[:-1]), parts[-1]


def _openat2(dirfd: int, rel: str, flags: int, mode: int = 0, resolve: int = 0) -> int | None:
    """openat2 beneath `dirfd` with no symlinks (and the `resolve` flags); None where the kernel
    lacks it (then it is not tried again)."""
    global _has_openat2
    if not _has_openat2:
        return None
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0,
                   RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | resolve)
    fd = libc.syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_long(dirfd), os.fsencode(rel), ctypes.byref(how),
                      ctypes.c_size_t(ctypes.sizeof(how)))
    if fd >= 0:
        return fd
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EPERM):  # not this kernel, or a seccomp filter refuses it
        _has_openat2 = False
        return None
    raise OSError(code, os.strerror(code), rel)


_has_openat2 = True  # until the kernel says otherwise


def _subdir(dirfd: int, name: str, mode: int | None) -> int:
    """The directory `name` in `dirfd`, never through a symlink; created first when `mode` is given."""
    if mode is not None:
        try:
            os.mkdir(name, mode, dir_fd=dirfd)
        except FileExistsError:
            pass
    return os.open(name, DIR_FLAGS, dir_fd=dirfd)


def makedirs_beneath(dirfd: int, rel: str, mode: int | None = 0o755) -> int:
    """A descriptor of directory `rel` below `dirfd` ("": a new descriptor of `dirfd`), each missing
    component created with `mode` (None: none created); OSError (ELOOP, ENOTDIR) where a component
    is a symlink or not a directory."""
    fd = os.dup(dirfd)
    try:
        for part in _parts(rel):
            fd, parent = _subdir(fd, part, mode), fd
            os.close(parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_beneath(dirfd: int, rel: str, flags: int, mode: int = 0o600) -> int:
    """Open `rel` below `dirfd` without following a symlink at any component."""
    above, name = _split(rel)
    fd = _openat2(dirfd, rel, flags, mode)
    if fd is not None:
        return fd
    parent = makedirs_beneath(dirfd, above, mode=None)
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
    finally:
        os.close(parent)


def create_beneath(dirfd: int, rel: str, mode: int = 0o644) -> int:
    """A new file `rel` below `dirfd` open for writing, its missing directories created (0755);
    FileExistsError when the name exists (as a file, a symlink or anything else)."""
    above, name = _split(rel)
    parent = makedirs_beneath(dirfd, above)
    try:
        return os.open(name, CREATE_FLAGS, mode, dir_fd=parent)
    finally:
        os.close(parent)


@contextmanager
def _fs_ids(uid: int, gid: int):
    """The calling thread's file-system uid and gid are `uid`/`gid`, with no supplementary groups,
    inside the block (root's file capabilities drop with them); restored after."""
    setfsuid, setfsgid, setgroups = _SYSCALLS[platform.machine()]
    groups = os.getgroups()
    saved = (ctypes.c_uint * max(1, len(groups)))(*groups)
    try:
        check(libc.syscall(ctypes.c_long(setgroups), ctypes.c_size_t(0), None), "setgroups")
        libc.syscall(ctypes.c_long(setfsgid), ctypes.c_long(gid))  # they return the old id, never fail
        libc.syscall(ctypes.c_long(setfsuid), ctypes.c_long(uid))
        if libc.syscall(ctypes.c_long(setfsuid), ctypes.c_long(-1)) != uid:  # -1 changes nothing: reads it back
            raise OSError(errno.EPERM, f"cannot take uid {uid} to open files")
        yield
    finally:
        libc.syscall(ctypes.c_long(setfsuid), ctypes.c_long(os.geteuid()))
        libc.syscall(ctypes.c_long(setfsgid), ctypes.c_long(os.getegid()))
        check(libc.syscall(ctypes.c_long(setgroups), ctypes.c_size_t(len(groups)), saved), "setgroups")


def open_as(path: str, flags: int, ids: tuple[int, int] | None, dir_fd: int | None = None) -> int:
    """Open a caller's `path` (relative to `dir_fd` when given; symlinks followed unless `flags`
    say O_NOFOLLOW, as the opener may) with the file-system uid/gid `ids` and no groups (only root
    may ask), or as this process when None. `ids` needs Linux on x86_64 or aarch64."""
    if ids is None:
        return os.open(path, flags | os.O_CLOEXEC, dir_fd=dir_fd)
    if platform.machine() not in _SYSCALLS:
        raise OSError(errno.ENOSYS, f"opening files as another uid is not implemented on {platform.machine()}")
    with _fs_ids(*ids):
        return os.open(path, flags | os.O_CLOEXEC, dir_fd=dir_fd)


_MOUNTED = OSError(errno.EXDEV, "another file system is mounted there")


@dataclass
class _Level:
    name: str  # in its parent
    ident: tuple[int, int]  # (st_dev, st_ino)
    todo: list[str] = field(default_factory=list)  # subdirectories still to remove
    kept: set[str] = field(default_factory=set)  # entries that could not be removed
    more: bool = True  # entries not yet listed may remain


class _Removal:
    """One removal: holds the descriptor of the directory it is in, and the identities of those
    above it, so it can go back up through '..' only into the directory it came from."""

    BATCH = 4096  # entries listed before acting on them

    def __init__(self, top: int, deadline: float) -> None:
        st = os.fstat(top)
        self.fd, self.dev, self.deadline = top, st.st_dev, deadline
        self.stack = [_Level("", (st.st_dev, st.st_ino))]
        self.left, self.first, self.stopped = 0, "", ""

    def run(self) -> None:
        while not self.stopped:
            level = self.stack[-1]
            if level.todo:
                self._descend(level.todo.pop())
            elif level.more:
                self._scan(level)
            elif len(self.stack) == 1 or not self._ascend():
                return
            if time.monotonic() > self.deadline:
                self.stopped = "out of time"

    def _keep(self, level: _Level, name: str, err: OSError) -> None:
        level.kept.add(name)
        self.left += 1
        if not self.first:
            where = "/".join([lv.name for lv in self.stack[1:]] + [name])
            self.first = f"{valid_text(where)}: {err.strerror or err}"

    def _unlink(self, level: _Level, name: str) -> bool:
        """Unlink `name` (kept when that fails); False when it is a directory."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            return False
        except OSError as err:
            self._keep(level, name, err)
        return True

    def _scan(self, level: _Level) -> None:
        """Unlink the entries that are not directories, up to BATCH of them; note the directories."""
        listed = 0
        with os.scandir(self.fd) as entries:
            for entry in entries:
                if entry.name in level.kept:
                    continue
                listed += 1
                if entry.is_dir(follow_symlinks=False) or not self._unlink(level, entry.name):
                    level.todo.append(entry.name)
                if listed >= self.BATCH:
                    break
        level.more = listed >= self.BATCH

    def _descend(self, name: str) -> None:
        """Into the subdirectory `name`: a name that is no longer a directory is unlinked, a mount
        point is left as it is."""
        level = self.stack[-1]
        try:
            child = _openat2(self.fd, name, DIR_FLAGS, resolve=RESOLVE_NO_XDEV)
            if child is None:
                child = os.open(name, DIR_FLAGS, dir_fd=self.fd)
        except FileNotFoundError:
            return
        except OSError as err:
            if err.errno in (errno.ELOOP, errno.ENOTDIR):  # swapped for a symlink or a file
                self._unlink(level, name)
            else:
                self._keep(level, name, _MOUNTED if err.errno == errno.EXDEV else err)
            return
        st = os.fstat(child)
        if st.st_dev != self.dev:  # openat2 refuses every mount point; without it, this sees other file systems'
            os.close(child)
            self._keep(level, name, _MOUNTED)
            return
        os.close(self.fd)
        self.fd = child
        self.stack.append(_Level(name, (st.st_dev, st.st_ino)))

    def _ascend(self) -> bool:
        """Back to the parent and remove the (emptied) directory we were in; False (and stopped) when
        '..' is no longer the directory we came from: the tree was moved under us."""
        parent = os.open("..", DIR_FLAGS, dir_fd=self.fd)
        st = os.fstat(parent)
        if (st.st_dev, st.st_ino) != self.stack[-2].ident:
            os.close(parent)
            self.stopped = "a directory was moved while the tree was removed"
            return False
        os.close(self.fd)
        self.fd, done = parent, self.stack.pop()
        try:
            os.rmdir(done.name, dir_fd=self.fd)
        except FileNotFoundError:
            pass
        except OSError as err:
            if not done.kept:  # a directory that could not be emptied is counted by its entries
                self._keep(self.stack[-1], done.name, err)
            else:
                self.stack[-1].kept.add(done.name)
        return True


def remove_tree(path: str | os.PathLike, seconds: float = REMOVE_SECONDS) -> str | None:
    """Remove the directory tree at `path` (a symlink or file there is removed itself, not followed).
    None when it is gone; else a one-line note saying what is left and why. Never raises OSError."""
    path = os.fspath(path)
    try:
        top = os.open(path, DIR_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENOTDIR):
            return f"cleanup: {path} left on disk: {err.strerror or err}"
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as again:
            return f"cleanup: {path} left on disk: {again.strerror or again}"
        return None
    removal = _Removal(top, time.monotonic() + seconds)
    try:
        removal.run()
    except OSError as err:
        removal.stopped = err.strerror or str(err)
    finally:
        os.close(removal.fd)
    if not removal.stopped and not removal.left:
        try:
            os.rmdir(path)
            return None
        except FileNotFoundError:
            return None
        except OSError as err:
            removal.stopped = err.strerror or str(err)
    why = [f"stopped: {removal.stopped}"] if removal.stopped else []
    if removal.left:
        why.append(f"{removal.left} entries could not be removed (first: {removal.first})")
    return f"cleanup: {path} left on disk ({'; '.join(why)})"


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of each range of the open file's first `size` bytes that holds data, in order
    (holes skipped). Moves the file's offset."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole is left
                return
            raise
        if start >= size:
            return
        offset = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, offset
