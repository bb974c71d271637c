"""Stopping a process tree before killing it: a stopped process cannot fork out of reach."""

from __future__ import annotations

import signal
from typing import Callable

import psutil

STOP_ROUNDS = 200  # fresh scans at most; each finds the children forked before the last SIGSTOP


def stop_all(find: Callable[[], list[psutil.Process]]) -> list[psutil.Process]:
    """SIGSTOP whatever `find()` returns until it returns nothing new; the processes stopped."""
    stopped: dict[int, psutil.Process] = {}
    for _ in range(STOP_ROUNDS):
        new = [p for p in find() if p.pid not in stopped]
        if not new:
            break
        for proc in new:
            try:
                proc.send_signal(signal.SIGSTOP)
                stopped[proc.pid] = proc
            except psutil.Error:
                pass
    return list(stopped.values())
