"""The job's directory and what it may hold on disk (`Limits.disk`).

`JobDisks` (one per supervisor) makes each job's work dir: a fresh root-owned 0700 directory from
mkdtemp, on which, where a disk limit is set and `[sandbox] disk_images` allows, a filesystem image
of the job's own is mounted (sandbox.job.loop). The kernel then refuses writes past the limit
(ENOSPC) and `JobDir.usage()` is one statvfs. Elsewhere `usage()` walks the directory (from
descriptors, never following a link, resumed across monitor ticks within a budget of entries) and
the monitor ends a job over its limit. Either way usage counts each file's allocated blocks, or
16 KiB per file and directory when that is more (an image has one inode per 16 KiB of the limit:
a job out of inodes has filled its disk as surely as one out of blocks).

`JobDir.remove()` unmounts the image (its files go with it: no walk, however deep or wide the tree
the job built) or removes the tree. Images a supervisor that died left mounted are unmounted when
the next supervisor with the same state dir starts (`reap`).
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
import threading
from pathlib import Path

from ..core.limits import ConfigError, Settings
from . import loop
from .cgroup.host import unescape_mountinfo
from .mounts import umount
from .safefs import DIR_FLAGS, remove_tree

MAX_DEPTH = 256  # directory levels a walk descends (one descriptor each)
TICK_ENTRIES = 2000  # entries a monitor tick walks at most; a walk resumes on the next tick
SHUTDOWN_ABOVE = 8 << 20  # bytes a job left in its image above which its filesystem is shut down first
_OWNER = re.compile(r"^(\d+)\.(\d+)-")  # image and mount names: "<pid>.<start time>-..."


def probe() -> str | None:
    """Why job filesystem images cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "the supervisor is not root (mounting an image needs CAP_SYS_ADMIN)"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control (the loop driver is not loaded)"
    if loop.mkfs_ext4() is None:
        return f"mkfs.ext4 not found in {loop.TOOL_PATH} (e2fsprogs)"
    return None


def _start_ticks(pid: int | str) -> str | None:
    """A process's start time in clock ticks since boot (with its pid, a name no other process has)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


class _Walk:
    """The blocks and inodes under a directory, from descriptors (no symlink followed, nothing
    resolved by name), resumable: `step(budget)` goes on where the last call stopped. Hard links
    are counted once. A walk stops after `max_entries` entries: as each counts INODE_BYTES, give
    it more than the limit's worth, so it never stops before the usage it found is over the limit
    (a fixed cap let a job hide any amount of data behind that many empty files)."""

    def __init__(self, top_fd: int, max_entries: int) -> None:
        self.top_fd, self.max_entries = top_fd, max_entries
        self.done_total: int | None = None  # of the last complete walk
        self.capped = False  # a walk met a directory deeper than MAX_DEPTH (for good: the job built it)
        self._stack: list[tuple[int, os.ScandirIterator]] = []
        self._blocks = self._entries = 0
        self._linked: set[tuple[int, int]] = set()

    def partial(self) -> int:
        return max(self._blocks, self._entries * loop.INODE_BYTES)

    def step(self, budget: int | None) -> bool:
        """Walk up to `budget` entries (None: to the end); True when a walk completed."""
        if not self._stack:
            self._blocks = self._entries = 0
            self._linked.clear()
            self._push(os.dup(self.top_fd))
        while self._stack and (budget is None or budget > 0):
            fd, entries = self._stack[-1]
            entry = next(entries, None)
            if entry is None or self._entries >= self.max_entries:
                self._pop()
                continue
            self._entries += 1
            budget = None if budget is None else budget - 1
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in self._linked:
                    continue
                self._linked.add((st.st_dev, st.st_ino))
            self._blocks += st.st_blocks * 512
            if stat.S_ISDIR(st.st_mode):
                if len(self._stack) >= MAX_DEPTH:
                    self.capped = True
                    continue
                try:
                    self._push(os.open(entry.name, DIR_FLAGS, dir_fd=fd))
                except OSError:
                    continue
        if self._stack:
            return False
        self.done_total = self.partial()
        return True

    def _push(self, fd: int) -> None:
        try:
            self._stack.append((fd, os.scandir(fd)))
        except OSError:
            os.close(fd)

    def _pop(self) -> None:
        fd, entries = self._stack.pop()
        entries.close()
        os.close(fd)

    def close(self) -> None:
        while self._stack:
            self._pop()


class JobDir:
    """One job's directory (`path`) under its disk `limit` (None: unlimited). With an image,
    `image_size` is its size in bytes; else `polled` says whether usage is walked for a limit, and
    `reason` why there is no image."""

    def __init__(self, path: Path, limit: int | None, reason: str = "") -> None:
        self.path, self.limit, self.reason = path, limit, reason
        self.image_size: int | None = None
        self._dev: int | None = None  # the image's loop device (held until it is unmounted)
        self._fd: int | None = None  # the directory (the image's root)
        self._base = (0, 0)  # (blocks, inodes) in use in an empty image
        self._walk: _Walk | None = None
        self._lock = threading.Lock()

    @property
    def polled(self) -> bool:
        return self.limit is not None and self.image_size is None

    def _open(self, image: tuple[int, int] | None = None) -> "JobDir":
        """Hold the directory open (and the `image`'s (size, loop device descriptor)); an image's
        usage counts from what the empty image holds."""
        if image is not None:
            self.image_size, self._dev = image
        self._fd = os.open(self.path, DIR_FLAGS)
        if image is not None:
            st = os.fstatvfs(self._fd)
            self._base = ((st.f_blocks - st.f_bfree) * st.f_frsize, st.f_files - st.f_ffree)
        return self

    def usage(self, final: bool = False) -> int | None:
        """Bytes the job holds in its directory (see the module's docstring); None without a limit.
        Polled, a call walks at most TICK_ENTRIES entries and reports the larger of the last
        complete walk and the one under way; `final` walks the whole tree now."""
        if self.limit is None:
            return None
        with self._lock:
            if self.image_size is not None:
                used, files = self._used(self._fd)
                return max(0, used, files * loop.INODE_BYTES)
            if self._walk is None:
                self._walk = _Walk(self._fd, self.limit // loop.INODE_BYTES + 1)
            if final:
                self._walk.close()
                self._walk.step(None)
            elif self._walk.step(TICK_ENTRIES):
                return self._deep(self._walk.done_total)
            return self._deep(max(self._walk.done_total or 0, self._walk.partial()))

    def _deep(self, used: int) -> int:
        """A tree deeper than MAX_DEPTH hides what lies below from the walk: count it as full."""
        return max(used, self.limit) if self._walk.capped else used

    def remove(self) -> list[str]:
        """Unmount the image (its files go with it), or remove the tree; notes for the result (what
        went wrong, what was measured only in part)."""
        notes = []
        with self._lock:
            if self._walk is not None:
                self._walk.close()
                if self._walk.capped:
                    notes.append(f"disk: the work dir is more than {MAX_DEPTH} levels deep, which the polled walk "
                                 "does not measure: it counted as full")
            fd, dev, self._fd, self._dev = self._fd, self._dev, None, None
            if dev is None:
                if fd is not None:
                    os.close(fd)
                left = remove_tree(self.path)
                return notes + ([left] if left else [])
            try:
                if fd is not None and self._used(fd)[0] <= SHUTDOWN_ABOVE:
                    os.close(fd)
                    fd = None
                loop.unmount(str(self.path), dev, fd)
                os.rmdir(self.path)
            except OSError as err:
                notes.append(f"disk: the job's filesystem image at {self.path} was not removed: {err}")
        return notes

    def _used(self, fd: int) -> tuple[int, int]:
        """(bytes, inodes) in use in the image open as `fd`, beyond what the empty image holds."""
        st = os.fstatvfs(fd)
        return (st.f_blocks - st.f_bfree) * st.f_frsize - self._base[0], st.f_files - st.f_ffree - self._base[1]


class JobDisks:
    """Makes job directories for one supervisor, per `[sandbox] disk_images` ("auto": an image where
    a disk limit is set and this process can mount one; "required": jobs with a disk limit are
    rejected where it cannot; "off": polled). Images are made in <state_dir>/disk (root's, 0700)."""

    def __init__(self, settings: Settings) -> None:
        self.mode = settings.disk_images
        self.unavailable = 'off by policy ([sandbox] disk_images = "off")' if self.mode == "off" else probe()
        self._images: loop.Images | None = None
        if self.unavailable is None:
            try:
                self._images = loop.Images(_private_dir(settings.resolved_state_dir() / "disk"),
                                           f"{os.getpid()}.{_start_ticks('self')}")
                reap(self._images.dir_fd)
            except OSError as err:
                self.unavailable = f"no directory for images: {err}"

    def make(self, job_id: str, limit: int | None) -> JobDir:
        """A new directory for the job, bounded by `limit` bytes where it is set. Raises ConfigError
        when images are required and cannot be made."""
        path = Path(tempfile.mkdtemp(prefix=f"tsbx-{job_id}-"))
        if limit is None:
            return JobDir(path, None)
        if self._images is None:
            return self._polled(JobDir(path, limit, self.unavailable or ""))
        jobdir = JobDir(path, limit)
        try:
            return jobdir._open(self._images.mount(job_id, str(path), limit))
        except (OSError, loop.ImageError) as err:
            jobdir.remove()
            why = f"the job's filesystem image failed: {err}"
        return self._polled(JobDir(Path(tempfile.mkdtemp(prefix=f"tsbx-{job_id}-")), limit, why))

    def prepare(self, limit: int | None) -> None:
        """Make ahead what a job with a `limit` would wait for (its image's template; see
        loop.Images.template): a warm server does, for its workers. Never raises."""
        if self._images is not None and limit is not None:
            try:
                self._images.template(limit)
            except (OSError, loop.ImageError):
                pass

    def _polled(self, jobdir: JobDir) -> JobDir:
        if self.mode == "required":
            jobdir.remove()
            raise ConfigError(f'disk images are required ([sandbox] disk_images = "required") but {jobdir.reason}')
        return jobdir._open()


def _private_dir(path: Path) -> int:
    """A descriptor of `path`, created root's and 0700; refused when anyone else could write it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, DIR_FLAGS)
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        raise PermissionError(f"{path} is not this user's alone (uid {st.st_uid}, mode {st.st_mode & 0o777:o})")
    return fd


def reap(images_fd: int) -> list[str]:
    """Unmount every image made in the directory open as `images_fd` by a process that is gone (its
    loop device then clears itself), remove the empty mount points and any file or directory such
    a process left there; the mount points unmounted."""
    images = os.readlink(f"/proc/self/fd/{images_fd}") + "/"
    devices = {}
    for name in os.listdir("/sys/block"):
        try:
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
            number = Path(f"/sys/block/{name}/dev").read_text().strip()
        except OSError:
            continue
        if backing.startswith(images) and _gone(backing[len(images):]):
            devices[number] = backing
    unmounted = []
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    for fields in mounts:
        if fields[2] in devices:
            point = unescape_mountinfo(fields[4])
            try:
                umount(point)
                unmounted.append(point)
                if os.path.basename(point).startswith("tsbx-"):
                    os.rmdir(point)
            except OSError:
                continue
    for name in os.listdir(images_fd):
        if _gone(name):
            try:
                if stat.S_ISDIR(os.stat(name, dir_fd=images_fd, follow_symlinks=False).st_mode):
                    os.rmdir(name, dir_fd=images_fd)
                else:
                    os.unlink(name, dir_fd=images_fd)
            except OSError:
                continue
    return unmounted


def _gone(name: str) -> bool:
    """Whether the process that named an image or directory "<pid>.<start time>-..." has ended."""
    m = _OWNER.match(name)
    return m is not None and _start_ticks(m.group(1)) != m.group(2)
