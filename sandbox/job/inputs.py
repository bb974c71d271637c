"""Files into a job: `JobSpec.inputs` placed in its dir before it starts.

Inputs (trusted: the caller's own paths) are files or directories, each copied to its place below
the job's working directory (see sandbox.core.placement), so the job opens them by the relative
path a script run with `python` in the caller's cwd would use. Files are mode 0444, root-owned
when the supervisor is root. A root supervisor only copies what the tenant's uid could read
itself: it opens each input once with the tenant's uid (the kernel checks the file and every
directory above it, symlinks in the caller's path followed as the tenant would follow them), then
copies from that descriptor, never from the name again. A directory is copied from its descriptor
down: each entry opened relative to its directory, with O_NOFOLLOW, as the tenant; its symlinks,
devices, fifos and sockets are not copied (named in a warning); at most MAX_INPUT_FILES files
and MAX_DEPTH levels. All of a job's inputs come to at most its disk limit in bytes.

A client of the node service sends open descriptors of files instead (`Sent`; its client expands
directories into their files): it opened them with its own permissions, and the service checks
that each is a readable regular file, and that all of a job's inputs come to at most
MAX_INPUT_BYTES, at admission (`check_sent_input`) and again as they are copied (they may grow).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..core.limits import ConfigError
from ..core.placement import named
from .files import MAX_DEPTH, copy_fd
from .safefs import DIR_FLAGS, create_beneath, makedirs_beneath, open_as

MAX_INPUTS = 64  # per job through the node service (each is an open descriptor until the job starts)
MAX_INPUT_BYTES = 4 << 30  # of all the inputs of one job sent to the node service
MAX_INPUT_FILES = 10_000  # in a job's input directories, all together
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY


@dataclass(frozen=True)
class Sent:
    """What a node service client sent with a job, read with its own permissions: the kernel
    file's contents, and one open descriptor per `JobSpec.inputs` entry (owned by the caller)."""

    source: bytes | None = None
    inputs: tuple[int, ...] = ()


def check_sent_input(name: str, fd: int) -> int:
    """The size of input `fd`; raises ConfigError unless it is a regular file open for reading, of
    at most MAX_INPUT_BYTES."""
    st, flags = os.fstat(fd), fcntl.fcntl(fd, fcntl.F_GETFL)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"inputs: {name}: not a regular file")
    if flags & getattr(os, "O_PATH", 0) or flags & os.O_ACCMODE == os.O_WRONLY:
        raise ConfigError(f"inputs: {name}: the descriptor is not open for reading")
    if st.st_size > MAX_INPUT_BYTES:
        raise ConfigError(f"inputs: {name}: {st.st_size} bytes, more than {MAX_INPUT_BYTES} per job")
    return st.st_size


def stage(inputs: list[tuple[str, str]], output_dir: str | None, workdir: str, reader: tuple[int, int] | None,
          fds: tuple[int, ...] | None = None, max_bytes: int | None = None) -> tuple[set[str], list[str]]:
    """Copy `inputs` ((source, place) pairs) into `workdir` (the job's cwd) read-only and create
    `output_dir`. `reader`: the (uid, gid) the job runs as, when that is not the supervisor's; an
    input is opened as that uid (see safefs.open_as), so one the job could not read itself is
    refused. `fds`: the inputs' open descriptors (sent by a client), read instead of their paths.
    `max_bytes`: of all inputs (the disk limit). Returns (the places of the files copied, relative
    to `workdir`; warnings). Raises ConfigError (one line) for a missing, unreadable or oversized input."""
    budget = MAX_INPUT_BYTES if fds is not None else None
    if max_bytes is not None:
        budget = max_bytes if budget is None else min(budget, max_bytes)
    try:
        work = os.open(workdir, DIR_FLAGS)
    except OSError as err:
        raise ConfigError(f"inputs: cannot open the job's dir: {err.strerror or err}") from None
    copier = _Copier(work, reader, budget, sent=fds is not None)
    try:
        for number, (path, place) in enumerate(inputs):
            source = fds[number] if fds is not None else _open_input(path, reader)
            try:
                if stat.S_ISDIR(os.fstat(source).st_mode):
                    copier.tree(source, path, place, 0)
                else:
                    copier.file(source, path, place)
            finally:
                if fds is None:
                    os.close(source)
    finally:
        os.close(work)
    if output_dir is not None:
        try:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"output_dir {output_dir}: cannot create it: {err.strerror or err}") from None
    notes = []
    if copier.skipped:
        notes.append(f"WARNING: inputs: {len(copier.skipped)} entries of input directories not copied (symlinks, "
                     f"devices, fifos, sockets: nothing in them is followed): {named(copier.skipped)}")
    return copier.placed, notes


def _unreadable(path: str, reader: tuple[int, int] | None) -> ConfigError:
    return ConfigError(f"inputs: {path} is not readable by the job's uid {reader[0] if reader else os.geteuid()}: "
                       "make it readable by others and its directories passable, or give the tenant its "
                       "owner's uid (run_as)")


def _open_input(path: str, reader: tuple[int, int] | None) -> int:
    """The caller's input `path`, opened once as the job's uid (`reader`) or as the supervisor:
    a descriptor of a regular file or a directory. Raises ConfigError."""
    try:
        fd = open_as(path, _READ, reader)
    except FileNotFoundError:
        raise ConfigError(f"inputs: {path}: not found") from None
    except PermissionError:
        raise _unreadable(path, reader) from None
    except OSError as err:
        raise ConfigError(f"inputs: {path}: {err.strerror or err}") from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        os.close(fd)
        raise ConfigError(f"inputs: {path}: not a regular file or a directory")
    return fd


class _Copier:
    """Copies opened inputs below the job's dir `work`, counting what they may take."""

    def __init__(self, work: int, reader: tuple[int, int] | None, budget: int | None, sent: bool) -> None:
        self.work, self.reader, self.budget, self.limit, self.sent = work, reader, budget, budget, sent
        self.placed: set[str] = set()
        self.skipped: list[str] = []
        self.files = 0

    def file(self, source: int, path: str, place: str) -> None:
        """Copy the regular file open as `source` (the caller's `path`) to `place`."""
        size = os.fstat(source).st_size
        if self.budget is not None and size > self.budget:
            raise ConfigError(f"inputs: {path}: grew past the job's {self.limit} bytes of inputs after it was sent"
                              if self.sent else f"inputs: {path}: the job's inputs come to more than its disk "
                                                f"limit ({self.limit} bytes)")
        try:
            target = create_beneath(self.work, place, 0o444)
            try:
                copied = copy_fd(source, target, size if self.budget is None else self.budget)
                os.fchmod(target, 0o444)  # whatever the umask
            finally:
                os.close(target)
        except OSError as err:
            raise ConfigError(f"inputs: cannot copy {path}: {err.strerror or err}") from None
        if self.budget is not None:
            self.budget -= copied
        self.placed.add(place)

    def tree(self, dirfd: int, path: str, place: str, depth: int) -> None:
        """Copy the directory open as `dirfd` (the caller's `path`) to `place`, its entries opened
        below it as the job's uid, never through a symlink."""
        if depth > MAX_DEPTH:
            raise ConfigError(f"inputs: {path}: more than {MAX_DEPTH} levels deep")
        try:
            os.close(makedirs_beneath(self.work, place))
            with os.scandir(dirfd) as entries:
                names = sorted(entry.name for entry in entries)
        except OSError as err:
            raise ConfigError(f"inputs: cannot copy {path}: {err.strerror or err}") from None
        for name in names:
            inner, at = f"{path.rstrip('/')}/{name}", f"{place}/{name}"
            try:
                kind = stat.S_IFMT(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode)
                fd = open_as(name, _READ | os.O_NOFOLLOW, self.reader, dir_fd=dirfd) if kind in (
                    stat.S_IFREG, stat.S_IFDIR) else None
            except FileNotFoundError:
                continue
            except PermissionError:
                raise _unreadable(inner, self.reader) from None
            except OSError as err:
                if err.errno != errno.ELOOP:
                    raise ConfigError(f"inputs: {inner}: {err.strerror or err}") from None
                fd = None  # replaced by a symlink meanwhile
            if fd is None:
                self.skipped.append(inner)
                continue
            try:
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    self.tree(fd, inner, at, depth + 1)
                elif stat.S_ISREG(os.fstat(fd).st_mode):
                    self.files += 1
                    if self.files > MAX_INPUT_FILES:
                        raise ConfigError(f"inputs: {path}: more than {MAX_INPUT_FILES} files in the job's input "
                                          "directories")
                    self.file(fd, inner, at)
                else:
                    self.skipped.append(inner)
            finally:
                os.close(fd)
