"""Where the node service listens, and the little of systemd it speaks: socket activation
(LISTEN_FDS) and readiness (sd_notify over $NOTIFY_SOCKET), by hand, without libsystemd."""

from __future__ import annotations

import grp
import os
import socket
from pathlib import Path

from ..core.limits import ConfigError
from .frames import default_socket

def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) our state, when it started us with $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError:
        pass


def gid_of(group: str, key: str = "group") -> int:
    """A group name or number (the `[service]` setting `key`) as a gid. Raises ConfigError."""
    try:
        return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"[service] {key}={group!r}: no such group") from None


def socket_path(configured: str | None) -> Path:
    """`configured`, else the default socket. Raises ConfigError when there is none."""
    path = configured or default_socket()
    if path is None:
        raise ConfigError("XDG_RUNTIME_DIR is not set: give the socket with --socket or [service] socket")
    return Path(path)


def listen(path: Path, group: str | None) -> tuple[socket.socket, bool]:
    """(the listening socket, whether we created its path). Takes systemd's socket when passed one."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        return socket.socket(fileno=3), False
    gid = gid_of(group) if group else None
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if path.is_socket():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                raise ConfigError(f"{path}: another service is listening there")
            except OSError:
                path.unlink()  # left by a service that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o117)  # created 0660 at once: no window with a wider mode
    try:
        sock.bind(str(path))
    except OSError as err:
        sock.close()
        raise ConfigError(f"{path}: cannot listen: {err}") from None
    finally:
        os.umask(umask)
    if gid is not None:
        os.chown(path, -1, gid)
    sock.listen(128)
    return sock, True
