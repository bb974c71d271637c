"""What flows back to one client of the node service: the output, live usage, output files and
verdicts of the jobs it follows, a job's `logs`, and `events`. One `Stream` per connection, used by
that connection's thread only; a client that stops reading for `timeout` seconds is dropped (OSError).
A verdict's frame is written in pieces as the client takes them: the arrays of its return value are
encoded a chunk at a time from their own memory, never whole (the value itself is counted against
the client's uid until sent, see JobRecord.hold_result).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import select
import socket
import threading
import uuid
from typing import Callable, Iterator

from ..core import values
from ..core.models import JobResult
from ..job.safefs import DIR_FLAGS, open_beneath, remove_tree
from . import frames
from .protocol import ProtocolError, error
from .jobs import Hub, JobRecord

FOLLOW_CHECK = 0.5  # seconds between checks that a following client is still there
CHUNK = 3 << 20  # bytes of an array encoded per write (a multiple of 3: base64 pieces join up)
CONTROL_FRAME = 4096  # the largest frame a following client may send (a `lease`)


class Stream:
    def __init__(self, conn: socket.socket, timeout: float | None) -> None:
        self.conn, self.timeout = conn, timeout

    def send(self, message: dict, fds: list[int] | tuple[int, ...] = ()) -> None:
        self.conn.settimeout(self.timeout)
        frames.send(self.conn, message, fds)

    def gone(self) -> bool:
        """Whether the client hung up (or shut its side down) on a connection it only reads from."""
        poller = select.poll()
        poller.register(self.conn, select.POLLIN | select.POLLRDHUP)
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
            return True
        try:
            return self.conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def follow(self, records: list[JobRecord], output: bool, samples: bool,
               on_frame: Callable[[dict], None] | None = None) -> None:
        """Each job's output, usage, output files and verdict until every job has one, then `end`.
        When the client goes away first, its jobs still pending are cancelled. Frames the client
        sends meanwhile go to `on_frame` (within FOLLOW_CHECK s; a ProtocolError it raises is
        answered with an error frame); a frame that cannot be read ends the following as a client
        that went away does."""
        wake = threading.Event()
        offsets = {r.spec.job_id: 0 for r in records}
        last_sample = {}
        pending = list(records)
        for record in records:
            record.watchers.add(wake)
        try:
            while not self.gone():
                wake.clear()
                if self._readable() and not self._take(on_frame):
                    return
                for record in list(pending):
                    job_id, result = record.spec.job_id, record.result  # the result first: output precedes it
                    if output:
                        offsets[job_id] = self.output(record, offsets[job_id])
                    if samples and record.sample is not None and record.sample is not last_sample.get(job_id):
                        last_sample[job_id] = record.sample
                        self.send({"type": "sample", "job_id": job_id, "sample": record.sample.model_dump()})
                    if result is not None:
                        self.files(record)
                        self.result(job_id, result)
                        pending.remove(record)
                        record.unfollow()
                if not pending:
                    self.send({"type": "end"})
                    return
                wake.wait(FOLLOW_CHECK)
        finally:
            for record in records:
                record.watchers.discard(wake)
            for record in pending:
                record.abandon()

    def _readable(self) -> bool:
        poller = select.poll()  # not select(): a service may hold descriptors past FD_SETSIZE
        poller.register(self.conn, select.POLLIN)
        return bool(poller.poll(0))

    def _take(self, on_frame: Callable[[dict], None] | None) -> bool:
        """Read one frame the client sent and hand it to `on_frame`; False when it cannot be read
        (or nothing takes frames here): the stream is out of step."""
        try:
            message = frames.recv(self.conn, limit=CONTROL_FRAME, idle=self.timeout or 5.0,
                                  within=self.timeout or 5.0)
        except (OSError, frames.FrameError):
            return False
        if message is None or on_frame is None:
            return False
        try:
            on_frame(message)
        except ProtocolError as err:
            self.send(error(err.code, str(err)))
        return True

    def result(self, job_id: str, result: JobResult) -> None:
        """The "result" frame, its arrays (base64 of their .npy form) encoded as they are written."""
        arrays: list = []
        token = uuid.uuid4().hex  # stands for each array in the JSON text; nothing else can contain it
        value = values.encode(result.return_value, lambda a: arrays.append(a) or f"{token}{len(arrays) - 1}")
        message = {"type": "result", "job_id": job_id, "exit_status": result.exit_status,
                   "result": {**result.model_dump(mode="json", exclude={"return_value"}), "return_value": value}}
        parts = re.split(f'"{token}(\\d+)"', json.dumps(message, separators=(",", ":"), allow_nan=False))
        texts = [part.encode() for part in parts[0::2]]
        npys = [values.npy_parts(arrays[int(number)]) for number in parts[1::2]]
        size = sum(map(len, texts)) + sum(2 + 4 * -(-(len(head) + data.nbytes) // 3) for head, data in npys)
        self.conn.settimeout(self.timeout)
        for piece in (frames.HEADER.pack(size), texts[0]):
            self.conn.sendall(piece)
        for (head, data), text in zip(npys, texts[1:]):
            for piece in itertools.chain((b'"',), _base64(head, data), (b'"', text)):  # one chunk at a time
                self.conn.sendall(piece)

    def files(self, record: JobRecord) -> None:
        """Each output file as a "file" frame carrying its descriptor, opened one at a time; then
        the job's spool directory is removed."""
        directory, files = record.files.take()
        if directory is None:
            return
        try:
            top = os.open(directory, DIR_FLAGS)
            try:
                for name, size in files:
                    fd = open_beneath(top, name, os.O_RDONLY)
                    try:
                        self.send({"type": "file", "job_id": record.spec.job_id, "name": name, "size": size}, [fd])
                    finally:
                        os.close(fd)
            finally:
                os.close(top)
        finally:
            remove_tree(directory)

    def output(self, record: JobRecord, offset: int) -> int:
        """The job's output from `offset` on; the new offset."""
        chunks, offset, dropped = record.output.read(offset)
        if dropped:
            self.send({"type": "output", "job_id": record.spec.job_id, "stream": "stderr",
                       "data": f"[taichi-sandbox: {dropped} characters of output dropped]\n"})
        for stream, text in chunks:
            self.send({"type": "output", "job_id": record.spec.job_id, "stream": stream, "data": text})
        return offset

    def logs(self, record: JobRecord, follow: bool) -> None:
        wake = threading.Event()
        record.watchers.add(wake)
        offset = 0
        try:
            while True:
                wake.clear()
                done = record.result is not None
                offset = self.output(record, offset)
                if done or not follow:
                    break
                wake.wait(1.0)
            self.send({"type": "end", "state": record.state})
        finally:
            record.watchers.discard(wake)

    def events(self, hub: Hub, accepts: Callable[[dict], bool], stop: threading.Event) -> None:
        """Verdicts and alerts `accepts` lets through, until the client leaves or `stop` is set."""
        sub = hub.subscribe(accepts)
        try:
            while not stop.is_set():
                sub.ready.wait(1.0)
                sub.ready.clear()
                if sub.dropped:
                    dropped, sub.dropped = sub.dropped, 0
                    self.send({"type": "event", "event": {"type": "dropped", "count": dropped}})
                while sub.backlog:
                    self.send({"type": "event", "event": sub.backlog.popleft()})
        finally:
            hub.unsubscribe(sub)


def _base64(head: bytes, data: memoryview) -> Iterator[bytes]:
    """base64 of `head` + `data` in pieces of about CHUNK bytes of input (each but the last a
    multiple of 3, so the pieces join into the encoding of the whole)."""
    pad = -len(head) % 3
    yield base64.b64encode(head + bytes(data[:pad]))
    for start in range(pad, data.nbytes, CHUNK):
        yield base64.b64encode(data[start:start + CHUNK])
