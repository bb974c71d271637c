"""Where the node service's socket is, and the frames on it: a 4-byte big-endian length, then that many bytes of one
UTF-8 JSON object. Never pickle. Imported by the thin client, so it imports only the standard library.

`recv` raises FrameError (a code and a one-line message) for anything but a whole, capped, JSON
object, and returns None on a clean end of stream between frames.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path

HEADER = struct.Struct("!I")
CLIENT_MAX_FRAME = 1 << 27  # what a client accepts from the service
SYSTEM_SOCKET = Path("/run/taichi-sandbox/sandbox.sock")
USER_SOCKET = "taichi-sandbox.sock"


def default_socket() -> Path | None:
    """/run/taichi-sandbox/sandbox.sock as root, else $XDG_RUNTIME_DIR/taichi-sandbox.sock (None
    without XDG_RUNTIME_DIR)."""
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / USER_SOCKET if runtime else None


class FrameError(Exception):
    """A frame that is not a whole, capped JSON object; `code` names the kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def encode(message: dict) -> bytes:
    data = json.dumps(message, separators=(",", ":"), allow_nan=False).encode()
    return HEADER.pack(len(data)) + data


def send(sock: socket.socket, message: dict) -> None:
    sock.sendall(encode(message))


def _read(sock: socket.socket, size: int, deadline: float | None, what: str, got: bytearray) -> bool:
    """Append `size` bytes to `got`; False on end of stream before the first byte of them."""
    start = len(got)
    while len(got) - start < size:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise FrameError("Timeout", f"incomplete {what}: {len(got) - start} of {size} bytes arrived in time")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(size - (len(got) - start), 1 << 20))
        except socket.timeout:
            continue
        if not chunk:
            if not got and what == "frame header":
                return False
            raise FrameError("Truncated", f"truncated {what}: the stream ended after {len(got) - start} of "
                                          f"{size} bytes")
        got += chunk
    return True


def recv(sock: socket.socket, limit: int = CLIENT_MAX_FRAME, idle: float | None = None,
         within: float | None = None) -> dict | None:
    """The next frame's object. `idle`: seconds to wait for a frame to begin (None: forever);
    `within`: seconds for the whole frame once it began; `limit`: the largest payload accepted."""
    header = bytearray()
    if idle is not None:
        sock.settimeout(idle)
        try:
            first = sock.recv(1)
        except socket.timeout:
            raise FrameError("IdleTimeout", f"no request within {idle:g} s") from None
        if not first:
            return None
        header += first
    deadline = None if within is None else time.monotonic() + within
    if not _read(sock, HEADER.size - len(header), deadline, "frame header", header):
        return None
    size = HEADER.unpack(header)[0]
    if size > limit:
        raise FrameError("FrameTooLarge", f"frame of {size} bytes exceeds the limit of {limit} bytes")
    payload = bytearray()
    _read(sock, size, deadline, "frame", payload)
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError) as err:
        raise FrameError("BadFrame", f"not JSON: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(message, dict):
        raise FrameError("BadFrame", f"expected a JSON object, got {type(message).__name__}")
    return message
