"""The job's output echoed live to the caller's streams, as it comes (the CLI, `run_kernel`,
`@sandboxed`, executor futures and Ray tasks), as timeout(1) passes output through."""

from __future__ import annotations

import codecs
import collections
import sys
import threading


class Echo:
    """`Pump` on_output callback that shows the job's output as it comes and never blocks the pump:
    chunks queue (at most BACKLOG bytes) for a writer thread, started on the first chunk, which
    writes them in arrival order to `sys.stdout` / `sys.stderr` as they are at that moment (so
    pytest's capture and a notebook's cell streams get them): the job's stdout to stdout (to stderr
    with `to_stderr`, which keeps our stdout for JSON), its stderr to stderr. Text is decoded
    incrementally (a character split across chunks is whole; invalid bytes become U+FFFD); with
    `raw` bytes go straight to the stream's binary `buffer` where it has one and is not a rich Live
    proxy. Past the backlog, chunks are dropped and a line in their place says how many bytes were
    not shown. `close()` (or leaving the `with` block) writes what is queued, waiting at most
    DRAIN seconds for a stream that does not take it."""

    BACKLOG = 8 << 20
    DRAIN = 10.0

    def __init__(self, to_stderr: bool = False, raw: bool = False) -> None:
        self.to_stderr, self.raw = to_stderr, raw
        self._decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in ("stdout", "stderr")}
        self._queue: collections.deque[tuple[str, bytes | None, int]] = collections.deque()
        self._queued = 0
        self._closed = False
        self._cv = threading.Condition()
        self._writer: threading.Thread | None = None

    def __enter__(self) -> "Echo":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, name: str, data: bytes) -> None:
        with self._cv:
            if self._closed:
                return
            if self._queued + len(data) > self.BACKLOG:
                last = self._queue[-1] if self._queue else None
                if last is not None and last[0] == name and last[1] is None:
                    self._queue[-1] = (name, None, last[2] + len(data))
                else:
                    self._queue.append((name, None, len(data)))
            else:
                self._queue.append((name, data, 0))
                self._queued += len(data)
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_all, name="tsbx-echo", daemon=True)
                self._writer.start()
            self._cv.notify()

    def close(self) -> None:
        """Write what is queued and the end of a split character, then stop (idempotent)."""
        with self._cv:
            self._closed = True
            writer = self._writer
            self._cv.notify()
        if writer is not None:
            writer.join(self.DRAIN)

    def _write_all(self) -> None:
        """The writer thread: the queue in order, then (once closed) the ends of split characters."""
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    break
                name, data, dropped = self._queue.popleft()
                self._queued -= len(data or b"")
            if data is None:
                self._write(name, None, f"\n[taichi-sandbox: {dropped} bytes of the job's {name} not shown: it "
                                        "wrote faster than they could be displayed]\n")
            else:
                self._write(name, data, None)
        for name, decoder in self._decoders.items():
            self._write(name, None, decoder.decode(b"", final=True))

    def _write(self, name: str, data: bytes | None, text: str | None) -> None:
        """`data` (the job's bytes) or `text` (ours) to the stream for `name`, as it is now; a closed
        or odd stream loses it (the result keeps the tails)."""
        stream = sys.stdout if name == "stdout" and not self.to_stderr else sys.stderr
        if stream is None or not (data or text):
            return
        try:
            buffer = getattr(stream, "buffer", None) if self.raw and not _rich_proxy(stream) else None
            if buffer is not None:
                stream.flush()
                buffer.write(data if data is not None else text.encode())
                buffer.flush()
            else:
                stream.write(self._decoders[name].decode(data) if data is not None else text)
                stream.flush()
        except Exception:  # noqa: BLE001 - whatever the caller's stream is, the job's supervision goes on
            pass


def _rich_proxy(stream) -> bool:
    """Whether `stream` is a rich Live display's proxy (never, while rich is not imported: run_kernel
    does not pay for importing it)."""
    proxy = sys.modules.get("rich.file_proxy")
    return proxy is not None and isinstance(stream, proxy.FileProxy)
