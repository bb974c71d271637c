"""The CLI's side of running jobs: the job's output echoed live, Ctrl-C/SIGTERM turned into a
graceful cancellation (as timeout(1) passes output through and forwards signals)."""

from __future__ import annotations

import codecs
import signal
import sys
import threading
from typing import Callable

from rich.console import Console
from rich.file_proxy import FileProxy


class Echo:
    """`Pump` on_output callback: the job's stdout to ours (to our stderr with `to_stderr`, which
    keeps our stdout for JSON), its stderr to our stderr. Under a rich Live display the streams
    are proxies that print above it, so text goes through them; otherwise bytes go straight out."""

    def __init__(self, to_stderr: bool = False) -> None:
        self.to_stderr = to_stderr
        self._decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}
        self._lock = threading.Lock()

    def __call__(self, name: str, data: bytes) -> None:
        stream = sys.stdout if name == "stdout" and not self.to_stderr else sys.stderr
        with self._lock:
            if isinstance(stream, FileProxy):
                stream.write(self._decoders[name].decode(data))
                stream.flush()
            else:
                stream.flush()
                stream.buffer.write(data)
                stream.buffer.flush()


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
