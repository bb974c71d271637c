"""The job's output side: one I/O thread per job reads stdout, stderr and the result channel."""

from __future__ import annotations

import collections
import os
import selectors
import threading
from typing import Callable

from ..core.channel import ChannelReader
from ..core.models import TAIL_BYTES


class Pump(threading.Thread):
    """Reads stdout, stderr and the channel until EOF; keeps bounded tails and exact byte counts.
    `on_output(name, data)` sees every chunk of stdout/stderr as it arrives (e.g. to echo it); if it
    raises it is not called again, and the pump goes on."""

    def __init__(self, stdout_r: int, stderr_r: int, channel_r: int, output_limit: int | None,
                 on_output_limit: Callable[[], None],
                 on_output: Callable[[str, bytes], None] | None = None) -> None:
        """`on_output(stream, data)`: each chunk of stdout/stderr as read (it must not block; one that
        raises is dropped, the accounting goes on)."""
        super().__init__(name="tsbx-io", daemon=True)
        self._output_limit, self._on_output_limit = output_limit, on_output_limit
        self._on_output = on_output
        self.fds = {stdout_r: "stdout", stderr_r: "stderr", channel_r: "channel"}
        self.tails = {"stdout": collections.deque(), "stderr": collections.deque()}
        self.tail_sizes = {"stdout": 0, "stderr": 0}
        self.counts = {"stdout": 0, "stderr": 0}
        self.channel = ChannelReader()
        self.stop_event = threading.Event()

    def output_bytes(self) -> int:
        return self.counts["stdout"] + self.counts["stderr"]

    def _keep(self, name: str, data: bytes) -> None:
        tail = self.tails[name]
        tail.append(data)
        self.tail_sizes[name] += len(data)
        while self.tail_sizes[name] - len(tail[0]) >= TAIL_BYTES:
            self.tail_sizes[name] -= len(tail.popleft())

    def tail(self, name: str) -> str:
        return b"".join(self.tails[name])[-TAIL_BYTES:].decode("utf-8", "replace")

    def _echo(self, name: str, data: bytes) -> None:
        if self._on_output is not None:
            try:
                self._on_output(name, data)
            except Exception:  # noqa: BLE001 - a broken echo must not stop the accounting
                self._on_output = None

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for fd in self.fds:
            sel.register(fd, selectors.EVENT_READ)
        open_fds = set(self.fds)
        while open_fds and not self.stop_event.is_set():
            for key, _ in sel.select(timeout=0.1):
                data = os.read(key.fd, 1 << 16)
                name = self.fds[key.fd]
                if not data:
                    sel.unregister(key.fd)
                    open_fds.discard(key.fd)
                elif name == "channel":
                    self.channel.feed(data)
                else:
                    self.counts[name] += len(data)
                    self._keep(name, data)
                    self._echo(name, data)
                    if self._output_limit is not None and self.output_bytes() > self._output_limit:
                        self._on_output_limit()
                        self._output_limit = None
        sel.close()
        for fd in self.fds:
            os.close(fd)
