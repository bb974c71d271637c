"""One node service per state dir: an exclusive flock on `<state_dir>/service.lock`, held for the
service's life (the kernel drops it when the process ends, however it ends), taken before the
service touches anything there (spool, audit reconciliation, job disks)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..core.limits import ConfigError

LOCK_NAME = "service.lock"


def lock_state_dir(state_dir: Path) -> int:
    """The descriptor holding the lock (keep it open; not inherited by children); the file names
    the holder's pid. Raises ConfigError (one line) when another process holds it."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"another service (pid {holder}) holds the state dir {state_dir} ({path}): stop it, or "
                          "give this one a [sandbox] state_dir of its own") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
