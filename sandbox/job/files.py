"""Files out of a job: what it leaves in its dir, copied out after it ends (files in:
sandbox.job.inputs); and a hint for a job that looked for a file it was not given.

Outputs (untrusted: the job controls its dir) are copied after every process of the job has ended:
regular files only, opened without following symlinks (relative to an already opened directory, so
no path component is followed either), owned by the job's uid when it had one of its own, at most
MAX_OUTPUT_FILES files and MAX_OUTPUT_BYTES bytes, and never more bytes than the job's disk limit
(hard links to one file would otherwise copy out as many files). Destination names are the directory
entries' own names, which cannot contain "/" or be "..". The destination `output_dir` is the
caller's path, taken as given; below it nothing is followed (a tenant may be able to write there):
directories are opened with O_NOFOLLOW from the one above, files are created with O_EXCL, and a
name that already exists is left as it is. The job's inputs and its kernel file are not outputs;
the sandbox's own files (Taichi's offline cache, result files, HOME, TMPDIR) live beside the job's
cwd, not in it. Nothing the job leaves is dropped silently: every file not copied (no outputs asked
for, matching no pattern, a name that exists, over a cap) and every entry skipped is named in a
WARNING note (the first few names, and how many more). Copying never raises.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import stat
from pathlib import Path, PurePosixPath

from ..core.placement import named
from ..core.values import valid_text
from .safefs import DIR_FLAGS, create_beneath, data_ranges

MAX_OUTPUT_FILES = 1000
MAX_OUTPUT_BYTES = 4 << 30
MAX_DEPTH = 32
MAX_SCANNED = 100_000


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


def collect(patterns: list[str], workdir: str, output_dir: str | None, owner: int | None,
            exclude: set[str] = frozenset(), max_files: int = MAX_OUTPUT_FILES,
            max_bytes: int = MAX_OUTPUT_BYTES) -> tuple[list[str], list[str]]:
    """Copy the files under `workdir` whose relative path matches one of `patterns` (fnmatch; `*`
    also matches '/') into `output_dir`, keeping relative paths; no patterns (or no `output_dir`):
    copy nothing. `owner`: the uid the job ran as when it was not the supervisor's (other owners'
    files, e.g. hard links, are skipped); `exclude`: relative paths that are not the job's (its
    inputs), passed over silently. Returns (copied paths, notes: a WARNING naming what was not
    copied). `output_dir` is the caller's path, opened once as given; below it every directory is
    opened without following symlinks and every file is created new: a name that exists is not replaced."""
    copied: list[str] = []
    notes: list[str] = []
    existing: list[str] = []
    unmatched: list[str] = []
    patterns = patterns if output_dir is not None else []
    walk, total, capped = _Walk(owner, exclude), 0, 0
    try:
        top = os.open(workdir, DIR_FLAGS)
    except OSError as err:
        return [], [f"WARNING: outputs: cannot read the job's dir: {err.strerror}"]
    try:
        dest = None
        if patterns:
            os.makedirs(output_dir, exist_ok=True)
            dest = os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as err:
        os.close(top)
        return [], [f"WARNING: outputs: nothing copied: cannot open output_dir {output_dir}: {err.strerror}"]
    try:
        for rel, dirfd, name in walk.files(top, ""):
            if not any(fnmatch.fnmatchcase(rel, p) for p in patterns):
                unmatched.append(rel)
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
                notes.append(f"WARNING: outputs: {rel} not copied: {why}")
                continue
            if size is None:
                capped += 1
                continue
            total += size
            copied.append(str(Path(output_dir, rel)))
    except OSError as err:  # a directory that cannot be listed
        notes.append(f"WARNING: outputs: stopped looking: {err.strerror or err}")
    finally:
        os.close(top)
        if dest is not None:
            os.close(dest)
    for names, what in ((unmatched if patterns else [], "file(s) matching no --output pattern (outputs=) not copied"),
                        ([] if patterns else unmatched, "file(s) the job left not copied (outputs are off; "
                                                        "--output-dir/output_dir= keeps them)"),
                        (walk.skipped, "entries skipped: not regular files of the job (symlinks, devices, other "
                                       "owners' files, too deep)"),
                        (existing, f"file(s) not copied: their names exist in {output_dir} (nothing is overwritten)")):
        if names:
            notes.append(f"WARNING: outputs: {len(names)} {what}: {named(names)}")
    if walk.unnamed:
        notes.append(f"WARNING: outputs: {walk.unnamed} entries passed over: their names are not UTF-8")
    if walk.scanned > MAX_SCANNED:
        notes.append(f"WARNING: outputs: stopped looking after {MAX_SCANNED} directory entries")
    if capped:
        notes.append(f"WARNING: outputs: {capped} matching file(s) not copied: the cap is {max_files} files and "
                     f"{max_bytes} bytes per job")
    return copied, notes


def collect_job(spec, plan, result, placed: set[str], disk: int | None = None) -> None:
    """`collect` for a finished job (its JobSpec and ChildPlan): the copies in `result.outputs`,
    the notes added to `result.notes`, at most `disk` bytes of them (its disk limit). `placed`:
    where its input files were put; they, and its kernel file when it was sent into its dir, are
    not outputs."""
    exclude = placed | {os.path.relpath(plan.target, plan.workdir)}
    result.outputs, notes = collect(spec.outputs, plan.workdir, spec.output_dir, plan.uid, exclude,
                                    max_bytes=min(MAX_OUTPUT_BYTES, disk or MAX_OUTPUT_BYTES))
    result.notes.extend(notes)


_NOT_FOUND = re.compile(r"\[Errno 2\] No such file or directory: (['\"])(?P<path>[^\n]+)\1")


def missing_input_hint(result, places: list[tuple[str, str]]) -> None:
    """Append to the reason of a job that failed on a FileNotFoundError for a relative path (as its
    channel reported it: type and message text) how to give it that file, unless it had an input
    there."""
    found = _NOT_FOUND.fullmatch(result.error_message or "") if result.error_type == "FileNotFoundError" else None
    if found is None or result.verdict.value != "error":
        return
    path = os.path.normpath(found["path"])
    if path.startswith("/") or ".." in PurePosixPath(path).parts or any(
            path == place or path.startswith(place + "/") for _, place in places):
        return
    result.reason += (f" — {path} is not in the job's directory: pass it with --input {path}, or --input "
                      f"PATH={path} from elsewhere (inputs=[...] from Python)")


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
            return copy_fd(src, dst, st.st_size)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def copy_fd(src: int, dst: int, most: int) -> int:
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
