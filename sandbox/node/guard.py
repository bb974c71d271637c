"""Control-plane protection of the node service, per uid and for the node: connections, request
rate, and the input descriptors held for unfinished jobs. Thread-safe; nothing is called while its
lock is held."""

from __future__ import annotations

import os
import resource
import threading
from pathlib import Path

from ..core.limits import Service as Settings
from ..core.ratelimit import TokenBucket
from ..job.inputs import MAX_INPUTS
from .executor import QueueFull


def raise_open_files() -> int:
    """Raise RLIMIT_NOFILE as far as allowed (root: to fs.nr_open; else to the hard limit); the new
    limit. Descriptors in flight (≤ frames.MAX_FDS per connection) then cannot use up the table."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if os.geteuid() == 0:
        try:
            want = max(hard, int(Path("/proc/sys/fs/nr_open").read_text()))
        except (OSError, ValueError):
            pass
    for limit in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
        except (OSError, ValueError):
            continue
    return soft


class Guard:
    """`[service]`'s bounds: `max_connections_per_uid` and `max_connections`, `request_rate` and
    `request_burst` per uid, `max_input_files_per_uid` and half the open-file limit for all, and
    `max_held_bytes_per_uid` (requests of unfinished jobs and results not yet read, together)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._connections: dict[int, int] = {}
        self._buckets: dict[int, TokenBucket] = {}
        self._held: dict[int, int] = {}  # input descriptors held for each uid's unfinished jobs
        self._bytes: dict[int, int] = {}  # ... and bytes of their requests (sources, args, shipped code) and unread results
        self._held_cap = max(MAX_INPUTS, raise_open_files() // 2)

    def connect(self, uid: int) -> str | None:
        """Count a new connection of `uid`; None, or why it is refused (then not counted)."""
        with self._lock:
            count, total = self._connections.get(uid, 0), sum(self._connections.values())
            if count >= (self.settings.max_connections_per_uid or 1 << 30):
                return f"uid {uid} already has {count} connections ([service] max_connections_per_uid)"
            if total >= (self.settings.max_connections or 1 << 30):
                return f"the service already has {total} connections ([service] max_connections)"
            self._connections[uid] = count + 1
            return None

    def disconnect(self, uid: int) -> None:
        with self._lock:
            self._connections[uid] -= 1

    def rate_allows(self, uid: int) -> bool:
        """Take one request from `uid`'s bucket."""
        rate = self.settings.request_rate
        if rate is None:
            return True
        burst = self.settings.request_burst or max(1, int(rate))
        with self._lock:
            return self._buckets.setdefault(uid, TokenBucket(rate, burst)).take()

    def hold(self, uid: int, files: int, size: int, what: str = "request") -> None:
        """Count what `uid` holds in the service: `files` more input descriptors and `size` more bytes
        of its unfinished jobs' requests or of results its clients have not read yet (negative:
        fewer; `what` names them for the refusal). Raises QueueFull past `max_input_files_per_uid`,
        the node's share of the file table, or `max_held_bytes_per_uid`."""
        per_uid = self.settings.max_input_files_per_uid or 1 << 30
        bytes_per_uid = self.settings.max_held_bytes_per_uid or 1 << 62
        with self._lock:
            mine, total = self._held.get(uid, 0), sum(self._held.values())
            held = self._bytes.get(uid, 0)
            if files > 0 and mine + files > per_uid:
                refusal = (f"uid {uid} holds {mine} input files for its unfinished jobs "
                           f"([service] max_input_files_per_uid={per_uid})")
            elif files > 0 and total + files > self._held_cap:
                refusal = f"the node holds {total} input files for unfinished jobs (half its open-file limit)"
            elif size > 0 and held + size > bytes_per_uid:
                refusal = (f"uid {uid}'s unfinished jobs and unread results hold {held} bytes in the service, and "
                           f"this {what} has {size} ([service] max_held_bytes_per_uid={bytes_per_uid})")
            else:
                refusal = None
                self._held[uid], self._bytes[uid] = mine + files, held + size
        if refusal is not None:
            raise QueueFull(refusal)
