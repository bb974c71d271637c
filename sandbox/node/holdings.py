"""What the node service holds for a job on its client's behalf: its output as text (`OutputLog`),
the client's input descriptors until the job starts (`Descriptors`), and its output files until
the client takes them (`Spool`). Each has its own lock; none calls out while holding it."""

from __future__ import annotations

import codecs
import collections
import os
import threading
from pathlib import Path

from ..job.safefs import remove_tree

OUTPUT_KEEP = 1 << 20  # characters of output kept per running job for `logs` and slow followers


class OutputLog:
    """A job's stdout/stderr as text (UTF-8, invalid bytes replaced), the last OUTPUT_KEEP
    characters of it; readers follow by offset and learn how much they missed."""

    def __init__(self) -> None:
        self._chunks: collections.deque[tuple[int, str, str]] = collections.deque()
        self._decoders: dict[str, codecs.IncrementalDecoder] = {}
        self._kept = 0
        self.end = 0
        self._lock = threading.Lock()

    def trim(self, keep: int) -> None:
        """Keep only about the last `keep` characters."""
        with self._lock:
            while self._chunks and self._kept - len(self._chunks[0][2]) >= keep:
                self._kept -= len(self._chunks.popleft()[2])

    def write(self, stream: str, data: bytes) -> None:
        if stream not in self._decoders:
            self._decoders[stream] = codecs.getincrementaldecoder("utf-8")("replace")
        text = self._decoders[stream].decode(data)
        if not text:
            return
        with self._lock:
            self._chunks.append((self.end, stream, text))
            self.end += len(text)
            self._kept += len(text)
        self.trim(OUTPUT_KEEP)

    def read(self, offset: int) -> tuple[list[tuple[str, str]], int, int]:
        """(chunks from `offset` on, the new offset, characters dropped before them)."""
        with self._lock:
            first = self._chunks[0][0] if self._chunks else self.end
            dropped = max(0, first - offset)
            out = [(stream, text[max(0, offset - start):]) for start, stream, text in self._chunks
                   if start + len(text) > offset]
            return out, self.end, dropped


class Descriptors:
    """A client's input descriptors, held until the job starts: taken once or closed once, under a
    lock (the worker and the executor's callbacks may race for them)."""

    def __init__(self, fds: list[int] | None = None) -> None:
        self._fds, self._lock = list(fds or []), threading.Lock()

    def take(self) -> list[int]:
        with self._lock:
            fds, self._fds = self._fds, []
            return fds

    def copies(self) -> list[int]:
        """Duplicates of the descriptors (the caller closes them); [] once closed."""
        with self._lock:
            return [os.dup(fd) for fd in self._fds]

    def close(self) -> None:
        close_fds(self.take())


def close_fds(fds: list[int]) -> None:
    """Close each descriptor; never raises."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Spool:
    """A finished job's output files, in a directory of the service's spool, until the client that
    follows the job takes them (and removes the directory once they are sent) or is gone (then they
    are removed here, now or as soon as they come). Nothing is held open meanwhile."""

    def __init__(self) -> None:
        self._dir: Path | None = None
        self._files: list[tuple[str, int]] = []
        self._closed, self._lock = False, threading.Lock()

    def put(self, directory: Path, files: list[tuple[str, int]]) -> None:
        """The job's output files: (name relative to `directory`, size)."""
        with self._lock:
            if not self._closed:
                self._dir, self._files = directory, files
                return
        remove_tree(directory)

    def take(self) -> tuple[Path | None, list[tuple[str, int]]]:
        """The directory and its files, once; the caller removes the directory."""
        with self._lock:
            taken = self._dir, self._files
            self._dir, self._files = None, []
            return taken

    def close(self) -> None:
        with self._lock:
            self._closed = True
        directory, _ = self.take()
        if directory is not None:
            remove_tree(directory)
