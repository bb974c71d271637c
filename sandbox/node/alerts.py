"""Alert events: quota crossings (once per crossing, with hysteresis and a hold-down), rejections and
limit violations.

Every event goes to the `sandbox.node.alerts` logger at once; then, on a thread of its own, to the audit
log, an optional Python hook and an optional command from limits.toml (`[alerts] command`, the
event as JSON on its stdin, at most COMMAND_TIMEOUT seconds). `emit` never blocks and never does
I/O beyond the log line, so callers may hold their scheduling lock: a slow hook or command delays
only other alerts, and when QUEUE_SIZE events wait, new ones are dropped and counted (`dropped`,
`on_drop`). A failing hook or command is logged and never disturbs the executor.
"""

from __future__ import annotations

import json
import logging
import queue
import subprocess
import threading
import time
from typing import Callable

from ..core.audit import AuditLog

log = logging.getLogger("sandbox.node.alerts")
COMMAND_TIMEOUT = 10.0
QUEUE_SIZE = 1000


class Alerts:
    """Delivers events; `quota()` turns usage ratios into de-duplicated crossing events. Call
    `close()` to deliver what is queued and stop the delivery thread."""

    def __init__(self, audit: AuditLog, levels: list[float], hook: Callable[[dict], None] | None = None,
                 command: list[str] | None = None, on_drop: Callable[[], None] | None = None,
                 hysteresis: float = 0.1, hold_down: float = 300.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.audit, self.levels, self.hook, self.command = audit, sorted(levels), hook, command or []
        self.on_drop = on_drop
        self.hysteresis, self.hold_down, self._clock = hysteresis, hold_down, clock
        self.dropped = 0
        self._crossed: dict[tuple[str, str, float], tuple[float, bool]] = {}  # -> (fired at, fell below since)
        self._lock = threading.Lock()
        self._queue: queue.Queue[dict | None] = queue.Queue(QUEUE_SIZE)
        self._command: subprocess.Popen | None = None  # the command delivering an event now
        self._abandoned = False  # closing took too long: deliver nothing more
        self._thread = threading.Thread(target=self._deliver_all, name="tsbx-alerts", daemon=True)
        self._thread.start()

    def emit(self, kind: str, **fields) -> dict:
        """Log the event and queue its delivery (dropped, and counted, when the queue is full)."""
        event = {"type": "alert", "kind": kind, "ts": time.time(), **fields}
        log.info("%s", json.dumps(event))
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            with self._lock:
                self.dropped += 1
            log.warning("alert queue full (%d waiting): %s alert dropped", QUEUE_SIZE, kind)
            if self.on_drop is not None:
                self.on_drop()
        return event

    def quota(self, tenant: str, resource: str, used: float, quota: float) -> None:
        """Emit `quota_crossed` when usage/quota reaches a level: once per crossing, not per job. A
        level that fired re-arms only once usage has fallen below level - `hysteresis` and
        `hold_down` seconds have passed since it fired."""
        ratio, now = (used / quota if quota else 0.0), self._clock()
        crossed = []
        with self._lock:
            for level in self.levels:
                key = (tenant, resource, level)
                if key in self._crossed:
                    fired, fell = self._crossed[key]
                    fell = fell or ratio < level - self.hysteresis
                    self._crossed[key] = (fired, fell)
                    if not (fell and now - fired >= self.hold_down):
                        continue
                    del self._crossed[key]
                if ratio >= level:
                    self._crossed[key] = (now, False)
                    crossed.append(level)
        for level in crossed:
            self.emit("quota_crossed", tenant=tenant, resource=resource, level=level, used=used, quota=quota,
                      ratio=round(ratio, 4))

    def close(self, timeout: float | None = None) -> None:
        """Deliver the queued events and stop, within `timeout` seconds (None: however long it
        takes); then the command running is killed and what is still queued is logged as lost."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("%d alert(s) not delivered within %gs of closing", self._queue.qsize(), timeout)
            with self._lock:
                self._abandoned = True
                if self._command is not None:
                    self._command.kill()
            self._thread.join()

    def _deliver_all(self) -> None:
        while (event := self._queue.get()) is not None and not self._abandoned:
            self._deliver(event)

    def _deliver(self, event: dict) -> None:
        try:
            self.audit.event(event)  # kept for a later write when the log cannot be written now
        except OSError as err:
            log.error("alert not in the audit log yet: %s", err)
        if self.hook is not None:
            try:
                self.hook(event)
            except Exception:  # noqa: BLE001 - a broken hook must not break delivery
                log.exception("alert hook failed")
        if self.command:
            try:
                with self._lock:
                    if self._abandoned:
                        return
                    self._command = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL)
                try:
                    self._command.communicate(json.dumps(event).encode(), timeout=COMMAND_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self._command.kill()
                    self._command.wait()
                    log.error("alert command %s took more than %gs: killed", self.command, COMMAND_TIMEOUT)
            except OSError as err:
                log.error("alert command %s failed: %s", self.command, err)
            finally:
                with self._lock:
                    self._command = None
