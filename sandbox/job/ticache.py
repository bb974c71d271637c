"""Each tenant's offline cache of compiled Taichi kernels: kept by the supervisor, only read by jobs.

Taichi 1.7 (its KernelCompilationManager) keeps a flat directory: `ticache.tcb`, the metadata in
Taichi's binary serializer (u64 length of the file, u16[3] Taichi version, u64 bytes of kernels,
u64 count, then per kernel: its key twice as u64 length + bytes, u64 size, i64 created_at, i64
last_used_at); one `<key>.tic` per kernel (b"TIC\\0", u32 arch, u64 lengths of metadata and code,
both, then the sha256 hex of both); and `ticache.lock` (created O_EXCL) while Taichi reads or writes
the metadata. On-disk keys are "T" and 64 hex digits. Taichi writes the cache when the job's
interpreter resets (sandbox.job.child), into `offline_cache_file_path`.

Contract:
- A job's `offline_cache_file_path` is `cache/` in its own work dir: whatever it writes there goes
  with the work dir (and counts against the job's disk).
- The tenant's kernels live in `<state_dir>/ticache/<tenant>`, which is the supervisor's: its files
  are the supervisor's uid's and read-only (0444); the directory is 0750 with the tenant's group, so
  jobs of that tenant (and no other tenant's) may read it, 0700 where jobs run as the supervisor's
  uid. A directory there that is not the supervisor's (a tenant-writable cache of an earlier
  release) is set aside unread, with a note.
- `seed`, before the job: the job's `cache/` gets a copy of the tenant's metadata (the job's own,
  for Taichi to rewrite) and a symlink to each kept kernel (Taichi reads through it; the kernel
  itself stays read-only for the job).
- `promote`, after the job: the supervisor parses the job's metadata (a regular file with one link,
  at most MAX_META bytes) and, for each kernel it lists that the tenant does not keep yet, reads the
  job's `<key>.tic` (opened from the directory's descriptor without following symlinks, a regular
  file with one link, within the quota), checks its header, lengths and hash, and copies it into a
  new read-only file of its own. Nothing else the job wrote is opened, listed or kept; no directory
  of the job's is walked.
- Last use: a kept kernel's last use is the later of its promotion and the last time a job read it
  (the access time of the job's symlink to it, which following it updates) or Taichi recorded using
  it in the job's metadata (never later than the job's end). Past `cache_quota` bytes of kernels,
  the least recently used are removed. A job can only make its own tenant's kernels look used.
- Several supervisors may share a state dir: the tenant's directory is flock'ed, shared to seed,
  exclusive to promote. Neither ever raises for what a job did; they return notes.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import importlib.metadata
import os
import re
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .safefs import CREATE_FLAGS, DIR_FLAGS

META = "ticache.tcb"
KEY = re.compile(r"T[0-9a-f]{64}")
TIC_HEAD = b"TIC\0"
TIC_FIXED = struct.calcsize("<IQQ") + len(TIC_HEAD)  # head, arch and the two lengths
HASH_HEX = 64
MAX_KERNELS = 10_000  # kernels in one metadata file
_ENTRY = struct.Struct("<Qqq")  # size, created_at, last_used_at
_HEAD = struct.Struct("<Q3HQQ")  # length of the file, version, bytes of kernels, count
MAX_META = _HEAD.size + MAX_KERNELS * (2 * (8 + 65) + _ENTRY.size)
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass
class Kernel:
    size: int
    created: int
    used: int


Kernels = dict[str, Kernel]


@functools.cache
def taichi_version() -> tuple[int, int, int] | None:
    """The installed Taichi's (major, minor, patch), which its metadata must carry; None without Taichi."""
    try:
        parts = re.findall(r"\d+", importlib.metadata.version("taichi"))[:3]
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(map(int, parts)) if len(parts) == 3 else None


def parse_meta(data: bytes) -> tuple[tuple[int, int, int], Kernels]:
    """(version, kernels) of a metadata file; ValueError for anything else."""
    try:
        length, *version, _, count = _HEAD.unpack_from(data)
        if length != len(data) or count > MAX_KERNELS:
            raise ValueError(f"length {length} of {len(data)} bytes, {count} kernels")
        kernels, pos = {}, _HEAD.size
        for _ in range(count):
            keys = []
            for _ in range(2):
                (size,) = struct.unpack_from("<Q", data, pos)
                if size > len(data) - pos:  # else the next offset may overflow struct's (OverflowError)
                    raise ValueError(f"a key of {size} bytes at offset {pos}")
                keys.append(data[pos + 8:pos + 8 + min(size, 65)].decode("ascii", "replace"))
                pos += 8 + size
            if keys[0] != keys[1] or not KEY.fullmatch(keys[0]):
                raise ValueError(f"not a kernel key: {keys[0][:70]!r}")
            size, created, used = _ENTRY.unpack_from(data, pos)
            pos += _ENTRY.size
            kernels[keys[0]] = Kernel(size, created, used)
    except struct.error as err:
        raise ValueError(f"truncated: {err}") from None
    if pos != len(data):
        raise ValueError(f"{len(data) - pos} bytes after the last kernel")
    return tuple(version), kernels


def dump_meta(version: tuple[int, int, int], kernels: Kernels) -> bytes:
    """The metadata file Taichi reads for `kernels`."""
    body = b"".join(struct.pack("<Q65sQ65s", 65, key.encode(), 65, key.encode())
                    + _ENTRY.pack(k.size, k.created, k.used) for key, k in kernels.items())
    head = _HEAD.pack(_HEAD.size + len(body), *version, sum(k.size for k in kernels.values()), len(kernels))
    return head + body


def check_tic(data: bytes) -> None:
    """ValueError unless `data` is a whole compiled kernel file whose hash matches its contents."""
    if data[:len(TIC_HEAD)] != TIC_HEAD or len(data) < TIC_FIXED + HASH_HEX:
        raise ValueError("not a TIC file")
    _, meta, code = struct.unpack_from("<IQQ", data, len(TIC_HEAD))
    if TIC_FIXED + meta + code + HASH_HEX != len(data):
        raise ValueError("its lengths do not add up to its size")
    if hashlib.sha256(data[TIC_FIXED:-HASH_HEX]).hexdigest().encode() != data[-HASH_HEX:]:
        raise ValueError("its hash does not match its contents")


class TenantCache:
    """One tenant's kept kernels: `path` (<state_dir>/ticache/<tenant>), at most `quota` bytes of
    them (0: none kept, none seeded); `group`: the gid of the tenant's jobs, which may read them
    (None: jobs run as the supervisor's uid)."""

    def __init__(self, path: Path, quota: int, group: int | None) -> None:
        self.path, self.quota, self.group = path, quota, group

    def seed(self, job_cache: Path, owner: tuple[int, int] | None) -> list[str]:
        """Before the job: the tenant's metadata and symlinks to its kernels into `job_cache` (an
        empty directory the supervisor made); the metadata file is `owner`'s (uid, gid)."""
        version = taichi_version()
        if self.quota == 0 or version is None:
            return []
        try:
            notes, fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_SH)
                data = _read(fd, META, MAX_META)
            except FileNotFoundError:
                return notes
            finally:
                os.close(fd)
            kept_version, kept = parse_meta(data)
            if kept_version != version:
                return notes
            job = os.open(job_cache, DIR_FLAGS)
            try:
                for key in kept:
                    os.symlink(str(self.path / f"{key}.tic"), f"{key}.tic", dir_fd=job)
                out = os.open(META, CREATE_FLAGS, 0o600, dir_fd=job)
                with os.fdopen(out, "wb") as f:
                    if owner is not None:
                        os.fchown(f.fileno(), *owner)
                    f.write(data)
            finally:
                os.close(job)
        except (OSError, ValueError) as err:
            return [f"offline cache: the tenant's kernels were not offered to the job: {err}"]
        return notes

    def promote(self, job_cache: Path) -> list[str]:
        """After the job (none of its processes left): keep the genuine kernels it compiled (see the
        module's contract), then evict past the quota."""
        version = taichi_version()
        if self.quota == 0 or version is None:
            return []
        refused: list[str] = []
        try:
            job = _open_beneath(job_cache)
        except OSError as err:
            return [f"offline cache: the job's cache directory is unusable ({err}); nothing kept"]
        try:
            try:
                job_version, claimed = parse_meta(_read(job, META, MAX_META))
            except FileNotFoundError:
                claimed = {}
            else:
                if job_version != version:
                    return [f"offline cache: the job's metadata is of Taichi {job_version}, not {version}; nothing kept"]
            notes, fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                kept = _kept(fd, version)
                now = int(time.time())
                budget = self.quota
                for key, kernel in claimed.items():
                    if key in kept:
                        kept[key].used = max(kept[key].used, min(now, max(kernel.used, _read_at(job, key))))
                        continue
                    try:
                        data = _read(job, f"{key}.tic", budget)
                        check_tic(data)
                    except (OSError, ValueError) as err:
                        refused.append(f"{key[:13]}…: {err.strerror if isinstance(err, OSError) else err}")
                        continue
                    budget -= len(data)
                    _write(fd, f"{key}.tic", data)
                    kept[key] = Kernel(len(data), now, now)
                evicted = _evict(kept, self.quota)
                _write(fd, META, dump_meta(version, kept))
                _sweep(fd, kept)
            finally:
                os.close(fd)
        except (OSError, ValueError) as err:
            return [f"offline cache: the job's kernels were not kept: {err}"]
        finally:
            os.close(job)
        if refused:
            notes.append(f"offline cache: {len(refused)} kernel(s) the job's metadata lists were not kept: "
                         + "; ".join(refused[:3]))
        if evicted:
            notes.append(f"offline cache: {evicted} least recently used kernel(s) removed (cache_quota "
                         f"{self.quota} bytes)")
        return notes

    def _open(self) -> tuple[list[str], int]:
        """(notes, a descriptor of the tenant's directory), made or set right: the supervisor's,
        0750 with the tenant's group (0700 without one)."""
        notes = []
        self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        parent = os.open(self.path.parent, DIR_FLAGS)
        try:
            name = self.path.name
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                pass
            fd = os.open(name, DIR_FLAGS, dir_fd=parent)
            if os.fstat(fd).st_uid != os.geteuid():
                os.close(fd)
                aside = f".{name}.untrusted-{time.time_ns()}"
                os.rename(name, aside, src_dir_fd=parent, dst_dir_fd=parent)
                notes.append(f"offline cache: {self.path} was not the supervisor's (a tenant could write it): "
                             f"set aside unread as {self.path.parent / aside}; remove it")
                os.mkdir(name, 0o700, dir_fd=parent)
                fd = os.open(name, DIR_FLAGS, dir_fd=parent)
        finally:
            os.close(parent)
        st = os.fstat(fd)
        if self.group is not None and st.st_gid != self.group:
            os.fchown(fd, -1, self.group)
        mode = 0o750 if self.group is not None else 0o700
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)
        return notes, fd


def _open_beneath(path: Path) -> int:
    """A descriptor of the directory `path` whose parent the supervisor made; the last component
    (the job's) is not followed."""
    parent = os.open(path.parent, DIR_FLAGS)
    try:
        return os.open(path.name, DIR_FLAGS, dir_fd=parent)
    finally:
        os.close(parent)


def _read(dir_fd: int, name: str, limit: int) -> bytes:
    """The contents of `name` in `dir_fd`: a regular file with one link of at most `limit` bytes,
    opened without following a symlink (OSError ELOOP) and read once."""
    fd = os.open(name, _READ, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise ValueError(f"{name} is not a regular file with one link")
        if st.st_size > limit:
            raise ValueError(f"{name} has {st.st_size} bytes, over the {limit} left")
        chunks, left = [], st.st_size + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) != st.st_size:
        raise ValueError(f"{name} changed while it was read")
    return data


def _read_at(job: int, key: str) -> int:
    """When the job last read kept kernel `key` through the symlink `seed` gave it (0: never, or the
    symlink is no longer the supervisor's). Following a symlink updates its access time (relatime:
    the first time after it was made)."""
    try:
        st = os.stat(f"{key}.tic", dir_fd=job, follow_symlinks=False)
    except OSError:
        return 0
    if not stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or st.st_atime_ns <= st.st_mtime_ns:
        return 0
    return int(st.st_atime)


def _kept(fd: int, version: tuple[int, int, int]) -> Kernels:
    """The tenant's kernels per its metadata (none when it is missing, unusable or of another Taichi)."""
    try:
        kept_version, kernels = parse_meta(_read(fd, META, MAX_META))
    except (OSError, ValueError):
        return {}
    return kernels if kept_version == version else {}


def _evict(kept: Kernels, quota: int) -> int:
    """Drop the least recently used kernels from `kept` until they fit in `quota` bytes; how many."""
    order = sorted(kept, key=lambda key: (kept[key].used, kept[key].created, key))
    total, evicted = sum(k.size for k in kept.values()), 0
    while total > quota:
        total -= kept.pop(order[evicted]).size
        evicted += 1
    return evicted


def _write(dir_fd: int, name: str, data: bytes) -> None:
    """`name` in the supervisor's directory `dir_fd` replaced at once by a new read-only file of `data`."""
    temp = f".{name}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444, dir_fd=dir_fd)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _sweep(fd: int, kept: Kernels) -> None:
    """Remove from the tenant's directory every file but the metadata and the kept kernels
    (evicted ones, leftovers of an interrupted promotion). Only the supervisor writes there."""
    wanted = {META, *(f"{key}.tic" for key in kept)}
    with os.scandir(fd) as entries:
        stale = [e.name for e in entries if e.name not in wanted and not e.is_dir(follow_symlinks=False)]
    for name in stale:
        os.unlink(name, dir_fd=fd)
