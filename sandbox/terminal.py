"""The CLI's side of running jobs: Ctrl-C/SIGTERM turned into a graceful cancellation (as timeout(1)
forwards signals). The job's output is echoed live by `sandbox.watch.echo`."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from rich.console import Console


class Interrupts:
    """While active, SIGINT and SIGTERM call `cancel()` once (in a thread of its own: a handler
    must not take locks the interrupted main thread may hold) instead of raising
    KeyboardInterrupt; `exit_code` is then 128 + the first signal's number (130, 143)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, cancel: Callable[[], None], console: Console, what: str = "the job") -> None:
        self._cancel, self._console, self._what = cancel, console, what
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Interrupts":
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        threading.Thread(target=self._cancel, name="tsbx-cancel", daemon=True).start()
        self._console.print(f"taichi-sandbox: {signal.Signals(signum).name}: cancelling {self._what} "
                            "(SIGTERM, then SIGKILL after its grace period)", markup=False, highlight=False,
                            soft_wrap=True)

    @property
    def exit_code(self) -> int | None:
        return 128 + self.signum if self.signum is not None else None
