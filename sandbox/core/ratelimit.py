"""A token bucket: the executor's per-tenant submission rate and the node service's per-uid
request rate. Not thread-safe: callers hold their own lock."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """Refills at `rate` tokens per second up to `burst`; starts full."""

    rate: float
    burst: int
    tokens: float = -1.0  # -1: full
    refilled: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = float(self.burst)

    def take(self) -> bool:
        """Take one token if there is one."""
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
