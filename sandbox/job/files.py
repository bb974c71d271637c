"""Files in and out of a job: `JobSpec.inputs` placed in its dir, `JobSpec.outputs` copied out.

Inputs (trusted: the caller's own paths) are copied into the job's working directory before it
starts, root-owned and mode 0444 when the supervisor is root, at the relative path the caller gave
(an absolute path by its name), so the job opens them by that relative path from its cwd. A root
supervisor only copies what the tenant's uid could read itself: it opens each input once with the
tenant's uid (the kernel checks the file and every directory above it, symlinks followed as the
tenant would follow them), then copies from that descriptor, never from the name again. A client
of the node service sends open descriptors instead (`Sent`): it opened them with its own
permissions, and the service checks that each is a readable regular file, and that all of a job's
inputs come to at most MAX_INPUT_BYTES, at admission (`check_sent_input`) and again as they are
copied (they may grow).

Outputs (untrusted: the job controls its dir) are copied after every process of the job has ended:
regular files only, opened without following symlinks (relative to an already opened directory, so
no path component is followed either), owned by the job's uid when it had one of its own, at most
MAX_OUTPUT_FILES files and MAX_OUTPUT_BYTES bytes, and never more bytes than the job's disk limit
(hard links to one file would otherwise copy out as many files). Destination names are the directory entries' own
names, which cannot contain "/" or be "..". The destination `output_dir` is the caller's path,
taken as given; below it nothing is followed (a tenant may be able to write there): directories are
opened with O_NOFOLLOW from the one above, files are created with O_EXCL, and a name that already
exists is left as it is and named in a note. Whatever is skipped is named in a note; copying never
raises.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..core.limits import ConfigError
from ..core.models import input_name
from ..core.values import valid_text
from .safefs import DIR_FLAGS, create_beneath, data_ranges, open_as

MAX_OUTPUT_FILES = 1000
MAX_OUTPUT_BYTES = 4 << 30
MAX_DEPTH = 32
MAX_SCANNED = 100_000
MAX_INPUTS = 64  # per job through the node service (each is an open descriptor until the job starts)
MAX_INPUT_BYTES = 4 << 30  # of all the inputs of one job sent to the node service
_NOTED = 5  # skipped entries named in a note; the rest are counted


@dataclass(frozen=True)
class Sent:
    """What a node service client sent with a job, read with its own permissions: the kernel
    file's contents, and one open descriptor per `JobSpec.inputs` name (owned by the caller)."""

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


def stage(inputs: list[str], output_dir: str | None, workdir: str, reader: tuple[int, int] | None,
          fds: tuple[int, ...] | None = None) -> None:
    """Copy `inputs` into `workdir` (the job's cwd) read-only and create `output_dir`. `reader`:
    the (uid, gid) the job runs as, when that is not the supervisor's; an input is opened as that
    uid (see safefs.open_as), so one the job could not read itself is refused. `fds`: the inputs'
    open descriptors (sent by a client), read instead of their paths. Each input is opened once and
    copied from that descriptor into a file created new below the job's dir (safefs.create_beneath).
    Raises ConfigError (one line) for a missing, unreadable or clashing input."""
    placed: dict[str, str] = {}
    budget = MAX_INPUT_BYTES  # of the inputs sent as descriptors, all together (they may have grown)
    try:
        work = os.open(workdir, DIR_FLAGS)
    except OSError as err:
        raise ConfigError(f"inputs: cannot open the job's dir: {err.strerror or err}") from None
    try:
        for number, path in enumerate(inputs):
            name = input_name(path)
            if name in placed:
                raise ConfigError(f"inputs: {path!r} and {placed[name]!r} would both be {name!r} in the job's dir")
            placed[name] = path
            source = fds[number] if fds is not None else _open_input(path, reader)
            try:
                size = os.fstat(source).st_size
                if fds is not None and size > budget:
                    raise ConfigError(f"inputs: {path}: grew past the job's {MAX_INPUT_BYTES} bytes of inputs after "
                                      "it was sent")
                target = create_beneath(work, name, 0o444)
                try:
                    copied = _copy_fd(source, target, budget if fds is not None else size)
                    os.fchmod(target, 0o444)  # whatever the umask
                finally:
                    os.close(target)
                if fds is not None:
                    budget -= copied
            except OSError as err:
                raise ConfigError(f"inputs: cannot copy {path}: {err.strerror or err}") from None
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


def _open_input(path: str, reader: tuple[int, int] | None) -> int:
    """The caller's input file `path`, opened once as the job's uid (`reader`) or as the supervisor:
    a descriptor of a regular file. Raises ConfigError."""
    try:
        fd = open_as(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY, reader)
    except FileNotFoundError:
        raise ConfigError(f"inputs: {path}: not found") from None
    except PermissionError:
        raise ConfigError(f"inputs: {path} is not readable by the job's uid {reader[0] if reader else os.geteuid()}: "
                          "make it readable by others and its directories passable, or give the tenant its "
                          "owner's uid (run_as)") from None
    except OSError as err:
        raise ConfigError(f"inputs: {path}: {err.strerror or err}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ConfigError(f"inputs: {path}: not a regular file")
    return fd


class _Walk:
    """The regular files of one directory tree, found without following symlinks. `owner`: only
    files of this uid count (None: any); `exclude`: relative paths passed over silently. Stops
    looking after MAX_SCANNED entries, so a job that made millions cannot stall the supervisor."""

    def __init__(self, owner: int | None, exclude: set[str]) -> None:
        self.owner, self.exclude = owner, exclude
        self.skipped: list[str] = []
        self.scanned = 0
        self.unnamed = 0  # entries whose names are not UTF-8 (no result could name them)

    def files(self, dirfd: int, prefix: str, depth: int = 0):
        """(relative path, directory fd, name) of each regular file, sorted per directory, depth first."""
        names = []
        with os.scandir(dirfd) as entries:
            for entry in entries:
                self.scanned += 1
                if self.scanned > MAX_SCANNED:
                    break
                names.append(entry.name)
        for name in sorted(names):
            if valid_text(name) != name:
                self.unnamed += 1
                continue
            rel = prefix + name
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            except OSError:
                continue
            if rel in self.exclude:
                continue
            if stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
                try:
                    fd = os.open(name, DIR_FLAGS, dir_fd=dirfd)
                except OSError:
                    self.skipped.append(rel + "/")
                    continue
                try:
                    yield from self.files(fd, rel + "/", depth + 1)
                finally:
                    os.close(fd)
            elif stat.S_ISREG(st.st_mode) and self.owner in (None, st.st_uid):
                yield rel, dirfd, name
            else:
                self.skipped.append(rel)


def collect(patterns: list[str], workdir: str, output_dir: str, owner: int | None,
            exclude: set[str] = frozenset(), max_files: int = MAX_OUTPUT_FILES,
            max_bytes: int = MAX_OUTPUT_BYTES) -> tuple[list[str], list[str]]:
    """Copy the files under `workdir` whose relative path matches one of `patterns` (fnmatch; `*`
    also matches '/') into `output_dir`, keeping relative paths. `owner`: the uid the job ran as
    when it was not the supervisor's (other owners' files, e.g. hard links, are skipped);
    `exclude`: relative paths not to copy (the inputs). Returns (copied paths, notes).
    `output_dir` is the caller's path, opened once as given; below it every directory is opened
    without following symlinks and every file is created new: a name that exists is not replaced."""
    copied: list[str] = []
    notes: list[str] = []
    existing: list[str] = []
    walk, total, capped = _Walk(owner, exclude), 0, 0
    try:
        top = os.open(workdir, DIR_FLAGS)
    except OSError as err:
        return [], [f"outputs: cannot read the job's dir: {err.strerror}"]
    try:
        os.makedirs(output_dir, exist_ok=True)
        dest = os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        os.close(top)
        return [], [f"outputs: cannot open output_dir {output_dir}: {err.strerror}"]
    try:
        for rel, dirfd, name in walk.files(top, ""):
            if not any(fnmatch.fnmatchcase(rel, p) for p in patterns):
                continue
            if len(copied) >= max_files or total >= max_bytes:
                capped += 1
                continue
            try:
                size = _copy(dirfd, name, owner, dest, rel, max_bytes - total)
            except FileExistsError:
                existing.append(rel)
                continue
            except OSError as err:
                why = ("a symlink or file is in its way in output_dir" if err.errno in (errno.ELOOP, errno.ENOTDIR)
                       else err.strerror or err)
                notes.append(f"outputs: {rel} not copied: {why}")
                continue
            if size is None:
                capped += 1
                continue
            total += size
            copied.append(str(Path(output_dir, rel)))
    except OSError as err:  # a directory that cannot be listed
        notes.append(f"outputs: stopped looking: {err.strerror or err}")
    finally:
        os.close(top)
        os.close(dest)
    matched = [s for s in walk.skipped if any(fnmatch.fnmatchcase(s.rstrip("/"), p) for p in patterns)]
    if matched:
        notes.append(f"outputs: skipped {len(matched)} entries that are not regular files of the job "
                     f"(symlinks, devices, other owners' files, too deep): {_named(matched)}")
    if existing:
        notes.append(f"outputs: {len(existing)} file(s) not copied: their names exist in output_dir (nothing is "
                     f"overwritten): {_named(existing)}")
    if walk.unnamed:
        notes.append(f"outputs: {walk.unnamed} entries passed over: their names are not UTF-8")
    if walk.scanned > MAX_SCANNED:
        notes.append(f"outputs: stopped looking after {MAX_SCANNED} directory entries")
    if capped:
        notes.append(f"outputs: {capped} matching file(s) not copied: the cap is {max_files} files and "
                     f"{max_bytes} bytes per job")
    return copied, notes


def _named(names: list[str]) -> str:
    """The first few of `names`, and how many more."""
    return ", ".join(names[:_NOTED]) + (f" and {len(names) - _NOTED} more" if len(names) > _NOTED else "")


def collect_job(spec, plan, result, disk: int | None = None) -> None:
    """`collect` for a finished job (its JobSpec and ChildPlan): the copies in `result.outputs`,
    the notes added to `result.notes`, at most `disk` bytes of them (its disk limit). Its inputs,
    and its kernel file when it was sent into its dir, are not outputs."""
    if spec.outputs:
        placed = {input_name(p) for p in spec.inputs} | {os.path.relpath(plan.target, plan.workdir)}
        result.outputs, notes = collect(spec.outputs, plan.workdir, spec.output_dir, plan.uid, placed,
                                        max_bytes=min(MAX_OUTPUT_BYTES, disk or MAX_OUTPUT_BYTES))
        result.notes.extend(notes)


def _copy(dirfd: int, name: str, owner: int | None, dest: int, rel: str, budget: int) -> int | None:
    """Copy one file (opened without following links) to a new file `rel` below `dest`; its size,
    or None when it is larger than `budget` bytes (nothing is written then)."""
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        st = os.fstat(src)
        if not stat.S_ISREG(st.st_mode) or owner not in (None, st.st_uid):
            raise OSError(0, "no longer a regular file of the job")
        if st.st_size > budget:
            return None
        dst = create_beneath(dest, rel)
        try:
            return _copy_fd(src, dst, st.st_size)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_fd(src: int, dst: int, most: int) -> int:
    """Copy the regular file open as `src` (from its start) into the empty file open as `dst`, at
    most `most` bytes of it, keeping its holes (a sparse file, or a memfd, stays sparse); the copy's
    size. Moves the offsets of both."""
    size = min(os.fstat(src).st_size, most)
    for start, end in data_ranges(src, size):
        os.lseek(dst, start, os.SEEK_SET)
        while start < end and (sent := os.sendfile(dst, src, start, end - start)):
            start += sent
        if start < end:
            break  # the file shrank meanwhile
    os.ftruncate(dst, size)
    return size
