"""A filesystem of a fixed size on a loop device: the kernel's bound on what a job holds on disk.

`Images` makes one ext4 image per limit with mkfs.ext4, once, and keeps it in memory as the extents
mkfs wrote (about 100-150 KiB). `Images.mount(name, target, limit)` writes them into a new sparse
file in the images directory, attaches it to a free loop device (LOOP_CONFIGURE, Linux 5.8+, else
LOOP_SET_FD + LOOP_SET_STATUS64; LO_FLAGS_AUTOCLEAR), unlinks the file at once and mounts the
device at `target` (nosuid, nodev, noatime). From then on the image has no name: the mount and the caller's
descriptor of the device hold the device, the device holds the file; `unmount` releases all three
(the device clears itself when its last opener goes, the file's blocks go back to the host). A
supervisor that dies leaves at most a mount (see sandbox.job.disk.reap), never a file.

The image: 4 KiB blocks, no journal (nothing in it must survive a crash), no blocks reserved for
root, one inode per INODE_BYTES of the limit, its root directory root's, mode 0700, no lost+found;
mounted without write barriers (nothing in it must reach the disk: a flush would only make the host
filesystem commit for a file about to be dropped).
Its size is measured, not guessed: mounted once, statvfs must show at least `limit` bytes and
limit / INODE_BYTES inodes free, else it is made again larger. Kernel facts: loop(4), ioctl_fs(2)
FS_IOC_SHUTDOWN, ext4(5).
"""

from __future__ import annotations

import collections
import errno
import itertools
import fcntl
import os
import queue
import shutil
import struct
import subprocess
import threading
from dataclasses import dataclass

from .mounts import MS_NOATIME, MS_NODEV, MS_NOSUID, mount, umount
from .safefs import data_ranges

BLOCK = 4096
INODE_BYTES = 16 << 10  # each file or directory counts at least this much against the limit
SPARE_INODES = 16  # ext4's reserved inodes and the job's own dirs
LOOP_CTL_GET_FREE, LOOP_CONFIGURE, LOOP_SET_FD, LOOP_SET_STATUS64 = 0x4C82, 0x4C0A, 0x4C00, 0x4C04
LO_FLAGS_AUTOCLEAR = 4
FS_IOC_SHUTDOWN, SHUTDOWN_NOLOGFLUSH = 0x8004587D, 2  # _IOR('X', 125, __u32); EXT4_GOING_FLAGS_NOLOGFLUSH
LOOP_INFO64 = struct.Struct("=5Q4I64s64s32s2Q")  # struct loop_info64
TOOL_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # where mkfs.ext4 is looked for (never the caller's PATH)
MKFS_OPTIONS = ("-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-m", "0", "-O", "^has_journal,^resize_inode",
                "-E", "lazy_itable_init=1,nodiscard")
MOUNT_DATA = "noinit_itable,nobarrier"  # a sparse file reads as zeros: no inode tables to zero
TEMPLATES_KEPT = 16
_SERIAL = itertools.count()  # file names unique within this process, whatever the job ids
ATTACH_TRIES = 8
SIZING_TRIES = 4


class ImageError(RuntimeError):
    """An image could not be made, attached or mounted (the message is one line)."""


@dataclass(frozen=True)
class Template:
    """A made and measured image: its size and the extents mkfs (and the first mount) wrote."""

    size: int
    extents: tuple[tuple[int, bytes], ...]


def mkfs_ext4() -> str | None:
    return shutil.which("mkfs.ext4", path=TOOL_PATH)


def _loop_config(image_fd: int, flags: int) -> bytes:
    """struct loop_config: fd, block size, loop_info64, reserved."""
    info = LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, flags, b"", b"", b"", 0, 0)
    return struct.pack("=II", image_fd, BLOCK) + info + bytes(64)


def _configure(dev: int, image_fd: int) -> None:
    """Bind the open image to the open loop device, clearing itself on last close. Buffered, not
    direct I/O: a job that writes little causes no write to the host's disk at all (its image's
    pages are dropped with the file), where direct I/O made every mount and unmount wait on it."""
    try:
        fcntl.ioctl(dev, LOOP_CONFIGURE, _loop_config(image_fd, LO_FLAGS_AUTOCLEAR))
        return
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
    fcntl.ioctl(dev, LOOP_SET_FD, image_fd)  # before Linux 5.8
    fcntl.ioctl(dev, LOOP_SET_STATUS64, LOOP_INFO64.pack(0, 0, 0, 0, 0, 0, 0, 0, LO_FLAGS_AUTOCLEAR, b"", b"", b"",
                                                         0, 0))


def attach(image_fd: int) -> tuple[int, int]:
    """Attach the open image file to a free loop device: (the device's open descriptor, its number).
    The device clears itself when its last opener closes it: keep the descriptor until it is
    unmounted (then the clearing happens in that close, not later in the kernel's own time)."""
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(ATTACH_TRIES):  # another process may take the free device first
            number = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
            dev = os.open(f"/dev/loop{number}", os.O_RDWR | os.O_CLOEXEC)
            try:
                _configure(dev, image_fd)
                return dev, number
            except OSError as err:
                os.close(dev)
                if err.errno != errno.EBUSY:
                    raise
    finally:
        os.close(ctl)
    raise ImageError(f"no free loop device after {ATTACH_TRIES} tries")


def _mount(dev: int, number: int, target: str) -> None:
    """Mount attached loop device `number` (open as `dev`) at `target`; `dev` is closed if that fails."""
    try:
        mount(f"/dev/loop{number}", target, "ext4", MS_NOSUID | MS_NODEV | MS_NOATIME, MOUNT_DATA)
    except BaseException:
        os.close(dev)
        raise


class _Closer:
    """Closes loop device descriptors in a thread of its own: the last close clears the device,
    which waits for the block layer to quiesce (a few ms on a busy machine) and need not delay
    the job's verdict. Ends with the process (the kernel then closes what is left)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def close(self, fd: int) -> None:
        self._queue.put(fd)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tsbx-loop-close", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            os.close(self._queue.get())


_CLOSER = _Closer()


def unmount(target: str, dev: int, root_fd: int | None = None) -> None:
    """Unmount the image at `target` and close `dev`, its loop device's descriptor (which frees the
    device and the image a moment later, see _Closer). `root_fd`: a descriptor of its root, known
    to be an image of ours: the filesystem is shut down first, so what the job left unwritten is
    dropped instead of written to an image about to be discarded. Both descriptors are closed
    whatever happens."""
    try:
        if root_fd is not None:
            try:
                fcntl.ioctl(root_fd, FS_IOC_SHUTDOWN, struct.pack("I", SHUTDOWN_NOLOGFLUSH))
            finally:
                os.close(root_fd)
        umount(target)
    finally:
        _CLOSER.close(dev)


def _extents(fd: int, size: int) -> tuple[tuple[int, bytes], ...]:
    """(offset, bytes) of each written range of the open sparse file."""
    return tuple((start, os.pread(fd, end - start, start)) for start, end in data_ranges(fd, size))


def _first_size(limit: int, inodes: int) -> int:
    """A first guess at the image size that leaves `limit` bytes free: ext4 keeps 2% of its blocks
    (at most 16 MiB) for itself, plus the inode table and per-group bitmaps."""
    blocks = -(-limit // BLOCK)
    groups = blocks // 32768 + 1
    reserved = min(blocks // 50 + 1, 4096)
    return (blocks + reserved + inodes * 256 // BLOCK + 4 * groups + 64) * BLOCK


# Templates by limit, shared by every `Images` of this process (and inherited by a warm server's
# workers, sandbox.warm): a template depends only on its limit.
_TEMPLATES: collections.OrderedDict[int, Template] = collections.OrderedDict()
_TEMPLATES_LOCK = threading.Lock()


class Images:
    """Job filesystem images, made in the directory open as `dir_fd` (root's, mode 0700). File
    names start with `tag` (the owning process, for sandbox.job.disk.reap). Thread-safe."""

    def __init__(self, dir_fd: int, tag: str) -> None:
        self.dir_fd, self.tag = dir_fd, tag

    def mount(self, label: str, target: str, limit: int) -> tuple[int, int]:
        """Mount a fresh image with at least `limit` bytes free at `target`: (its size, its loop
        device's descriptor, for `unmount`). `label` goes into the image file's name (the job id).
        Raises ImageError or OSError (nothing is left attached then)."""
        template = self.template(limit)
        name = f"{self.tag}-{next(_SERIAL)}-{label}.img"
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self.dir_fd)
        try:
            os.ftruncate(fd, template.size)
            for offset, data in template.extents:
                os.pwrite(fd, data, offset)
            dev, number = attach(fd)
        finally:
            os.unlink(name, dir_fd=self.dir_fd)
            os.close(fd)
        _mount(dev, number, target)
        return template.size, dev

    def template(self, limit: int) -> Template:
        with _TEMPLATES_LOCK:
            if limit in _TEMPLATES:
                _TEMPLATES.move_to_end(limit)
                return _TEMPLATES[limit]
            template = self._make(limit)
            _TEMPLATES[limit] = template
            if len(_TEMPLATES) > TEMPLATES_KEPT:
                _TEMPLATES.popitem(last=False)
            return template

    def _make(self, limit: int) -> Template:
        """mkfs.ext4 an image, mount it, prepare its root and measure it; larger until it holds `limit`."""
        inodes = -(-limit // INODE_BYTES) + SPARE_INODES
        size = _first_size(limit, inodes)
        for _ in range(SIZING_TRIES):
            name = f"{self.tag}-{next(_SERIAL)}-template-{limit}"
            fd = os.open(name + ".img", os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=self.dir_fd)
            try:
                os.ftruncate(fd, size)
                self._mkfs(fd, inodes)
                free, free_inodes = self._prepare(fd, name)
                if free >= limit and free_inodes * INODE_BYTES >= limit:
                    return Template(size, _extents(fd, size))
            finally:
                os.unlink(name + ".img", dir_fd=self.dir_fd)
                os.close(fd)
            size += -(-max(0, limit - free) // BLOCK) * BLOCK + 16 * BLOCK
            inodes += max(0, -(-limit // INODE_BYTES) - free_inodes)
        raise ImageError(f"mkfs.ext4 made no image holding {limit} bytes in {SIZING_TRIES} tries")

    @staticmethod
    def _mkfs(fd: int, inodes: int) -> None:
        tool = mkfs_ext4()
        if tool is None:
            raise ImageError(f"mkfs.ext4 not found in {TOOL_PATH}")
        done = subprocess.run([tool, *MKFS_OPTIONS, "-N", str(inodes), f"/proc/self/fd/{fd}"], pass_fds=(fd,),
                              env={"PATH": TOOL_PATH}, cwd="/", stdin=subprocess.DEVNULL, capture_output=True,
                              text=True)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
            raise ImageError(f"mkfs.ext4 failed: {why}")

    def _prepare(self, fd: int, name: str) -> tuple[int, int]:
        """Mount the new image once: its root becomes 0700 without lost+found; (bytes, inodes) free."""
        os.mkdir(name, 0o700, dir_fd=self.dir_fd)
        target = f"/proc/self/fd/{self.dir_fd}/{name}"
        try:
            dev, number = attach(fd)
            _mount(dev, number, target)
            try:
                os.rmdir(f"{target}/lost+found")
                os.chmod(target, 0o700)
                st = os.statvfs(target)
            finally:
                unmount(target, dev)
        finally:
            os.rmdir(name, dir_fd=self.dir_fd)
        return st.f_bavail * st.f_frsize, st.f_favail
