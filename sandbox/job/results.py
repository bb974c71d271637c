"""A job's return value, from the child to the supervisor through files in its result directory
(`result/` beside the job's working directory), never through pickle.

Child (`write`): the value in tagged JSON (sandbox.core.values) as `value.json`, each numpy array as
`N.npy`, at most `max_result` bytes in all; over that nothing more is written and the size is
reported instead. Supervisor (`load`): the directory belongs to the job, so it is read as hostile:
every path component is opened without following symlinks, only regular files with one link and the
names `value.json` and `N.npy` (N < MAX_ARRAYS) are read, sizes are checked before reading, at most
the bytes the child reported writing in all (so a caller may count them before the value is read;
never over `max_result`), arrays with `numpy.load(allow_pickle=False)` after checking their header
against their size, object dtypes refused.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core import values

RESULT_DIR = "result"
VALUE_FILE = "value.json"
MAX_ARRAYS = 100_000
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def directory(workdir: str) -> str:
    """The result directory of the job whose working directory is `workdir`."""
    return os.path.join(os.path.dirname(workdir), RESULT_DIR)


def write(value: Any, workdir: str, max_result: int | None) -> int | None:
    """Child side: write `value` (None: nothing); returns the bytes it takes, written or not (over
    `max_result`, at least that many). Raises values.UnsupportedValue for what cannot be returned."""
    if value is None:
        return None
    arrays: list[np.ndarray] = []
    text = json.dumps(values.encode(value, lambda a: arrays.append(a) or len(arrays) - 1),
                      allow_nan=False, separators=(",", ":")).encode()
    if len(arrays) > MAX_ARRAYS:
        raise values.UnsupportedValue(f"more than {MAX_ARRAYS} numpy arrays")
    total = len(text)
    limit = max_result if max_result is not None else float("inf")
    path = directory(workdir)
    os.makedirs(path, mode=0o700, exist_ok=True)
    for number, a in enumerate(arrays):
        if total + a.nbytes > limit:
            return total + sum(x.nbytes for x in arrays[number:])
        total += _create(os.path.join(path, f"{number}.npy"), values.npy_bytes(a))
    if total <= limit:
        _create(os.path.join(path, VALUE_FILE), text)
    return total


def _create(path: str, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return len(data)


@dataclass
class Loaded:
    """What the supervisor got: the value, or `over_limit` ("child"/"supervisor": who saw the result
    pass max_result, `size` bytes at least), or `error` (one line: the files are unusable)."""

    value: Any = None
    size: int = 0
    over_limit: str | None = None
    error: str | None = None


class _OverLimit(Exception):
    pass


def load(workdir: str, claimed: int | None, max_result: int | None) -> Loaded:
    """Supervisor side: the value the child reported writing (`claimed` bytes, None: no value; files
    holding more are unusable). Never raises for anything in the directory."""
    if claimed is None:
        return Loaded()
    if max_result is not None and claimed > max_result:
        return Loaded(size=claimed, over_limit="child")
    reader = _Reader(claimed)
    try:
        reader.open(os.path.dirname(workdir))
        text = reader.read(VALUE_FILE)
        return Loaded(value=values.decode(json.loads(text), reader.array), size=reader.used)
    except _OverLimit:
        if max_result is not None and reader.used > max_result:
            return Loaded(size=reader.used, over_limit="supervisor")
        return Loaded(error=f"unusable result files: they hold more than the {claimed} bytes the job reported")
    except (OSError, ValueError, RecursionError, TypeError, EOFError) as err:
        return Loaded(error=f"unusable result files: {type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}")
    finally:
        reader.close()


class _Reader:
    """Reads files of one result directory within a byte budget, opening nothing through a symlink."""

    def __init__(self, budget: int | None) -> None:
        self.budget, self.used, self.dir_fd = budget, 0, None

    def open(self, job_dir: str) -> None:
        top = os.open(job_dir, _OPEN | os.O_DIRECTORY)
        try:
            self.dir_fd = os.open(RESULT_DIR, _OPEN | os.O_DIRECTORY, dir_fd=top)
        finally:
            os.close(top)

    def _file(self, name: str) -> tuple[int, int]:
        """(fd, size) of a regular, singly linked file, its size counted against the budget."""
        fd = os.open(name, _OPEN, dir_fd=self.dir_fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise ValueError(f"{name} is not a regular file with one link")
        self.used += st.st_size
        if self.budget is not None and self.used > self.budget:
            os.close(fd)
            raise _OverLimit()
        return fd, st.st_size

    def read(self, name: str) -> bytes:
        fd, size = self._file(name)
        with os.fdopen(fd, "rb") as f:
            data = f.read(size)
        if len(data) != size:
            raise ValueError(f"{name} changed while read")
        return data

    def array(self, number: Any) -> np.ndarray:
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < MAX_ARRAYS:
            raise ValueError(f"array reference {number!r} is not a file number")
        fd, size = self._file(f"{number}.npy")
        with os.fdopen(fd, "rb") as f:
            return values.load_npy(f, size)

    def close(self) -> None:
        if self.dir_fd is not None:
            os.close(self.dir_fd)
