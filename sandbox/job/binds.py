"""Directories of the caller made visible read-write to the job at the same absolute path
(`JobSpec.binds`; the pytest plugin binds each sandboxed test's `tmp_path`). Supervisor side.

Safety rules, checked on descriptors (sandbox.job.safefs), never by resolving a name twice:
- the path is absolute and normalized, and no component of it is a symlink;
- every directory above it belongs to root or to the supervisor's uid and is not writable by
  others (or is sticky, as /tmp is), so nobody else can swap a component between the check and
  the job's mounts;
- the directory itself belongs to the supervisor's uid (the caller) and is not a mount point.
A job of a root supervisor runs as its tenant's uid: the directory is handed to that uid for the
job (fchown) and handed back after it, so a root supervisor lends only directories below the temp
directory (`tempfile.gettempdir()`) or another directory made for temporary directories
(`lendable_below`: the pytest plugin names its session's base temp directory), never a system one. The symlinks the job left anywhere in it are removed after
the job and named in the notes: they could lead the caller's later code (root's, or the user's
outside the job's read-only view) to write elsewhere. The job
sees the directory through a bind mount of its own (sandbox.job.mounts): nothing above it.
"""

from __future__ import annotations

import os
import stat
import tempfile

from ..core.limits import ConfigError
from .safefs import DIR_FLAGS

MAX_REMOVED_NAMED = 5  # symlinks named in the note; the rest are counted
_LENDABLE = {os.path.realpath(tempfile.gettempdir())}  # where a root supervisor's binds may lie
MAX_SWEPT = 100_000  # entries the symlink sweep looks at: a job's tree cannot hold the supervisor


def lendable_below(path: str) -> None:
    """Let a root supervisor lend directories below `path`, a directory made to hold temporary
    directories (pytest's base temp directory)."""
    _LENDABLE.add(os.path.realpath(path))


def _lendable(path: str) -> bool:
    return any(os.path.commonpath([path, top]) == top != path for top in _LENDABLE)


def _trusted_above(st: os.stat_result, uid: int) -> bool:
    """A directory nobody but root and `uid` can change entries of (sticky: only their own)."""
    return st.st_uid in (0, uid) and (not st.st_mode & 0o022 or bool(st.st_mode & stat.S_ISVTX))


def open_bound(path: str, uid: int) -> int:
    """A descriptor of the directory `path` that may be bound into a job of `uid`'s supervisor;
    ConfigError (one line) naming the rule it breaks."""
    fd = os.open("/", DIR_FLAGS)
    try:
        where = ""
        for part in path.strip("/").split("/"):
            st = os.fstat(fd)
            if not _trusted_above(st, uid):
                raise ConfigError(f"binds: {path}: {where or '/'} can be changed by others than uid {uid} "
                                  "(a directory above a bind must belong to root or to you and not be writable by others)")
            where += "/" + part
            try:
                child = os.open(part, DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                what = "a symlink" if os.path.islink(where) else err.strerror
                raise ConfigError(f"binds: {path}: {where} is {what} (a bind must be a directory reached "
                                  "without symlinks)") from None
            parent_dev = st.st_dev
            os.close(fd)
            fd = child
        st = os.fstat(fd)
        if st.st_uid != uid:
            raise ConfigError(f"binds: {path}: belongs to uid {st.st_uid}, not to you (uid {uid})")
        if st.st_dev != parent_dev:
            raise ConfigError(f"binds: {path}: a mount point (bind a directory inside it)")
        return fd
    except BaseException:
        os.close(fd)
        raise


class Binds:
    """The directories one job gets, held open from the check until `release()`."""

    def __init__(self, paths: list[str]) -> None:
        """Check and open each path (ConfigError, with nothing left open, when one breaks a rule)."""
        self.fds: dict[str, int] = {}
        self.lent: dict[str, tuple[int, int]] = {}  # path → its (uid, gid) before the job got it
        try:
            for path in paths:
                if os.geteuid() == 0 and not _lendable(path):
                    raise ConfigError(f"binds: {path}: a root supervisor lends only directories below "
                                      f"{' or '.join(sorted(_LENDABLE))} to a job (the directory's owner becomes "
                                      "the job's uid for its time)")
                self.fds[path] = open_bound(path, os.geteuid())
        except BaseException:
            self.release()
            raise

    def expose(self) -> list[tuple[str, bool]]:
        """ChildPlan.expose entries: each directory, writable."""
        return [(path, True) for path in self.fds]

    def lend(self, uid: int, gid: int) -> None:
        """Give each directory to the job's ids for the job's time (a root supervisor's tenant)."""
        for path, fd in self.fds.items():
            st = os.fstat(fd)
            self.lent[path] = (st.st_uid, st.st_gid)
            os.fchown(fd, uid, gid)

    def release(self) -> list[str]:
        """After the job: remove the symlinks it left in each directory, hand lent ones back, close
        them. Returns notes; never raises OSError."""
        notes = []
        for path, fd in self.fds.items():
            notes.extend(self._reclaim(path, fd))
            os.close(fd)
        self.fds, self.lent = {}, {}
        return notes

    def _reclaim(self, path: str, fd: int) -> list[str]:
        removed: list[str] = []
        seen = 0
        try:
            if path in self.lent:
                os.fchown(fd, *self.lent.pop(path))
            for top, dirs, files, dir_fd in os.fwalk(dir_fd=fd, follow_symlinks=False):
                seen += len(dirs) + len(files)
                if seen > MAX_SWEPT:
                    return [f"binds: {path}: more than {MAX_SWEPT} entries, not all checked for symlinks the "
                            "job left: check it before using it"]
                links = [name for name in (*dirs, *files)
                         if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)]
                for name in links:
                    os.unlink(name, dir_fd=dir_fd)
                    removed.append(os.path.normpath(os.path.join(path, top, name)))
                dirs[:] = [name for name in dirs if name not in links]
        except (OSError, RecursionError) as err:  # a vanished entry, or a tree deeper than fwalk recurses
            return [f"binds: {path}: not handed back whole ({getattr(err, 'strerror', None) or err}): "
                    "check it before using it"]
        if not removed:
            return []
        shown = ", ".join(removed[:MAX_REMOVED_NAMED]) + (f" and {len(removed) - MAX_REMOVED_NAMED} more"
                                                          if len(removed) > MAX_REMOVED_NAMED else "")
        return [f"binds: removed {len(removed)} symlink(s) the job left: {shown}"]
