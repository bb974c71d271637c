"""Where the node service's socket is, and the frames on it: a 4-byte big-endian length, then that many bytes of one
UTF-8 JSON object. Never pickle. Imported by the thin client, so it imports only the standard library.

`recv` raises FrameError (a code and a one-line message) for anything but a whole, capped, JSON
object, and returns None on a clean end of stream between frames.

A frame may carry open file descriptors (SCM_RIGHTS, attached to its first bytes): a client's
input files, read with its own permissions, and the service's copies of a job's output files. A
receiver that passes a list to `recv` gets them there (close-on-exec); one that does not, gets
none (the kernel closes them).
"""

from __future__ import annotations

import array
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
MAX_FDS = 253  # descriptors with one frame: the kernel's SCM_MAX_FD


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


def send(sock: socket.socket, message: dict, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one frame, with `fds` attached to its first bytes."""
    data = encode(message)
    if fds:
        data = data[socket.send_fds(sock, [data], list(fds)):]
    sock.sendall(data)


def _recv(sock: socket.socket, size: int, fds: list[int] | None) -> bytes:
    """Up to `size` bytes; descriptors that came with them are appended to `fds` (None: refused)."""
    if fds is None:
        return sock.recv(size)
    data, ancillary, flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[:len(payload) - len(payload) % 4]))
    if flags & socket.MSG_CTRUNC or len(fds) > MAX_FDS:  # counted as they come, not once the frame is whole
        raise FrameError("TooManyDescriptors", f"more than {MAX_FDS} file descriptors with one frame")
    return data


def _read(sock: socket.socket, size: int, deadline: float | None, what: str, got: bytearray,
          fds: list[int] | None = None) -> bool:
    """Append `size` bytes to `got`; False on end of stream before the first byte of them."""
    start = len(got)
    while len(got) - start < size:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise FrameError("Timeout", f"incomplete {what}: {len(got) - start} of {size} bytes arrived in time")
        sock.settimeout(remaining)
        try:
            chunk = _recv(sock, min(size - (len(got) - start), 1 << 20), fds)
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
         within: float | None = None, fds: list[int] | None = None) -> dict | None:
    """The next frame's object. `idle`: seconds to wait for a frame to begin (None: forever);
    `within`: seconds for the whole frame once it began; `limit`: the largest payload accepted;
    `fds`: where descriptors sent with the frame go (the caller closes them, also after an error)."""
    header = bytearray()
    if idle is not None:
        sock.settimeout(idle)
        try:
            first = _recv(sock, 1, fds)
        except socket.timeout:
            raise FrameError("IdleTimeout", f"no request within {idle:g} s") from None
        if not first:
            return None
        header += first
    deadline = None if within is None else time.monotonic() + within
    if not _read(sock, HEADER.size - len(header), deadline, "frame header", header, fds):
        return None
    size = HEADER.unpack(header)[0]
    if size > limit:
        raise FrameError("FrameTooLarge", f"frame of {size} bytes exceeds the limit of {limit} bytes")
    payload = bytearray()
    _read(sock, size, deadline, "frame", payload, fds)
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError) as err:
        raise FrameError("BadFrame", f"not JSON: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(message, dict):
        raise FrameError("BadFrame", f"expected a JSON object, got {type(message).__name__}")
    return message
