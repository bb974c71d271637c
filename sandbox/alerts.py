"""Alert events: quota crossings (once per crossing), rejections and limit violations.

Every event goes to the `sandbox.alerts` logger and the audit log, then to an optional Python hook
and an optional command from limits.toml (`[alerts] command`, the event as JSON on its stdin).
A failing hook or command is logged and never disturbs the executor.
"""

from __future__ import annotations

import json
import logging
import subprocess
import threading
import time
from typing import Callable

from .audit import AuditLog

log = logging.getLogger("sandbox.alerts")
COMMAND_TIMEOUT = 10.0


class Alerts:
    """Delivers events; `quota()` turns usage ratios into de-duplicated crossing events."""

    def __init__(self, audit: AuditLog, levels: list[float], hook: Callable[[dict], None] | None = None,
                 command: list[str] | None = None) -> None:
        self.audit, self.levels, self.hook, self.command = audit, sorted(levels), hook, command or []
        self._crossed: set[tuple[str, str, float]] = set()
        self._lock = threading.Lock()

    def emit(self, kind: str, **fields) -> dict:
        event = {"type": "alert", "kind": kind, "ts": time.time(), **fields}
        log.info("%s", json.dumps(event))
        self.audit.event(event)
        if self.hook is not None:
            try:
                self.hook(event)
            except Exception:  # noqa: BLE001 - a broken hook must not break scheduling
                log.exception("alert hook failed")
        if self.command:
            try:
                subprocess.run(self.command, input=json.dumps(event).encode(), timeout=COMMAND_TIMEOUT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            except (OSError, subprocess.SubprocessError) as err:
                log.error("alert command %s failed: %s", self.command, err)
        return event

    def quota(self, tenant: str, resource: str, used: float, quota: float) -> None:
        """Emit `quota_crossed` when usage/quota first reaches a level; re-arm when it falls below."""
        ratio = used / quota if quota else 0.0
        crossed = []
        with self._lock:
            for level in self.levels:
                key = (tenant, resource, level)
                if ratio >= level and key not in self._crossed:
                    self._crossed.add(key)
                    crossed.append(level)
                elif ratio < level:
                    self._crossed.discard(key)
        for level in crossed:
            self.emit("quota_crossed", tenant=tenant, resource=resource, level=level, used=used, quota=quota,
                      ratio=round(ratio, 4))
