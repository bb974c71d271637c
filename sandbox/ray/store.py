"""Where the cluster quota authority (sandbox.ray.authority) keeps its snapshot: one opaque blob,
loaded once at start and overwritten by each save. Store calls block; `GroupCommit` runs the saves
in a thread, one at a time. No Ray import at module level."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Callable, Protocol

log = logging.getLogger(__name__)
BACKOFF = (0.05, 5.0)  # first and longest pause between retries of a failed save (s)


class Store(Protocol):
    def load(self) -> bytes | None:
        """The last saved snapshot, or None when nothing was ever saved. Raises when it cannot tell."""

    def save(self, data: bytes) -> None:
        """Replace the snapshot with `data`; durable once it returns. Raises on failure."""


class MemoryStore:
    """A snapshot in this process (tests, benchmarks)."""

    def __init__(self, data: bytes | None = None) -> None:
        self.data = data
        self.saves = 0

    def load(self) -> bytes | None:
        return self.data

    def save(self, data: bytes) -> None:
        self.data = data
        self.saves += 1


class GcsStore:
    """The snapshot under `key` in the Ray GCS's key-value store, which outlives actors (a restarted
    authority finds it) for the lifetime of the cluster. Uses Ray's internal API
    (`ray.experimental.internal_kv`), which has no public equivalent and may change between Ray
    versions; needs a connected Ray worker or driver (`ray.init` done)."""

    def __init__(self, key: str = "authority", namespace: str = "taichi_sandbox") -> None:
        self.key, self.namespace = key, namespace

    @staticmethod
    def _kv():
        from ray.experimental import internal_kv
        if not internal_kv._internal_kv_initialized():
            raise RuntimeError("the GCS key-value store needs a connected Ray (ray.init)")
        return internal_kv

    def load(self) -> bytes | None:
        return self._kv()._internal_kv_get(self.key, namespace=self.namespace)

    def save(self, data: bytes) -> None:
        self._kv()._internal_kv_put(self.key, data, overwrite=True, namespace=self.namespace)


class FileStore:
    """The snapshot in a file, replaced atomically (written beside it, fsynced, renamed)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def load(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def save(self, data: bytes) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class GroupCommit:
    """Snapshots saved by group commit: each change bumps a version; `durable()` returns once a
    snapshot taken at or after that version is saved. One save in flight; changes meanwhile go into
    the next. A failed save is retried with backoff (and a fresh snapshot), never skipped."""

    def __init__(self, store: Store, snapshot: Callable[[], bytes]) -> None:
        self.store, self.snapshot = store, snapshot
        self.version = self.saved = 0
        self._syncs: list[tuple[int, asyncio.Future]] = []
        self._dirty = asyncio.Event()

    def changed(self) -> None:
        self.version += 1
        self._dirty.set()

    async def durable(self) -> None:
        """Return once every change so far is saved."""
        if self.saved >= self.version:
            return
        fut = asyncio.get_running_loop().create_future()
        self._syncs.append((self.version, fut))
        await asyncio.shield(fut)

    async def run(self) -> None:
        """The saver: runs until cancelled."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            pause = BACKOFF[0]
            while True:
                version = self.version
                try:
                    await asyncio.to_thread(self.store.save, self.snapshot())
                    break
                except Exception as err:  # noqa: BLE001 - retried: no reply before the state is durable
                    log.warning("could not save the authority's state (retrying in %g s): %s", pause, err)
                    await asyncio.sleep(pause)
                    pause = min(2 * pause, BACKOFF[1])
            self.saved = version
            done = [fut for v, fut in self._syncs if v <= version]
            self._syncs = [(v, fut) for v, fut in self._syncs if v > version]
            for fut in done:
                if not fut.done():
                    fut.set_result(None)

    def cancel(self) -> None:
        """Cancel every wait for a save (the saver is stopping)."""
        for _, fut in self._syncs:
            fut.cancel()
        self._syncs = []
