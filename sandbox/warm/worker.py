"""A warm server's worker: one client's `taichi-sandbox run`, through the ordinary CLI.

Forked by the zygote (sandbox.warm.server) on a connection from its own uid. It reads the request
(see sandbox.warm), takes the client's stdin/stdout/stderr, working directory, environment, argv,
umask, nice value, CPU affinity and rlimits, answers "ok" and, once the client says "go", runs
`sandbox.cli.main()`: whatever
the CLI does, it does as it would in the client's process. Its fork-server is the zygote's spare
when that was started with the configuration this run asks for (`Spare`), else a fresh one. The
client's signals come as "sig <n>" lines and are raised here; the client's end of the connection
closing is a SIGHUP here (a worker never outlives its client). It answers "exit <status>".
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import socket
import sys
import threading
from dataclasses import dataclass

from . import FORWARDED, HEADER, MAX_REQUEST, startup_env

RECEIVE_TIMEOUT = 10.0
SIGNALS = {int(getattr(signal, name)) for name in FORWARDED}
# The server's, from before any worker replaced them; PYTHON* ones did not act on it (`python -I`).
_ZYGOTE_STARTUP = {k: v for k, v in startup_env(dict(os.environ)).items() if not k.startswith("PYTHON")}


class BadRequest(ValueError):
    """The request is malformed; its one-line reason goes back to the client."""


def attributes() -> tuple:
    """What a fork-server inherits from the process that starts it, besides its environment:
    umask, nice value, CPU affinity, rlimits."""
    mask = os.umask(0o022)
    os.umask(mask)
    return (mask, os.getpriority(os.PRIO_PROCESS, 0), sorted(os.sched_getaffinity(0)),
            sorted((name, list(resource.getrlimit(getattr(resource, name)))) for name in dir(resource)
                   if name.startswith("RLIMIT_")))


@dataclass
class Spare:
    """A fork-server the zygote started ahead, with the configuration it was started with:
    `key` (audit log, base_env) and the starter's `attributes()`."""

    control: socket.socket
    process: object  # psutil.Process
    home: str
    key: tuple
    attributes: tuple


def serve(conn: socket.socket, spare: Spare | None, report: int) -> None:
    """Run one client's request in this (forked) process; never returns."""
    code = 125  # the in-process CLI's internal error, should anything fail before or around it
    try:
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            argv = _take(conn)
        except (BadRequest, OSError) as err:
            _send(conn, f"cold {str(err).splitlines()[0] if str(err) else type(err).__name__}\n")
            os._exit(0)
        _install_spare(spare, report)
        _send(conn, "ok\n")
        if not _committed(conn):
            os._exit(0)  # the client gave up waiting and runs in-process
        threading.Thread(target=_relay, args=(conn,), daemon=True).start()
        code = _run_cli(argv)
    finally:
        _send(conn, f"exit {code}\n")
        os._exit(0)


def _take(conn: socket.socket) -> list[str]:
    """Read and apply the request (stdio, cwd, environment, process attributes); the argv to run.
    Raises BadRequest when it is malformed or cannot be applied exactly."""
    conn.settimeout(RECEIVE_TIMEOUT)
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 4)
    try:
        if len(fds) != 4 or len(data) < HEADER.size:
            raise BadRequest("expected a request with 4 descriptors")
        size = HEADER.unpack_from(data)[0]
        if size > MAX_REQUEST:
            raise BadRequest("request too large")
        data = data[HEADER.size:]
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise BadRequest("truncated request")
            data += chunk
        try:
            request = json.loads(data)
            argv, env = request["argv"], request["env"]
            umask, nice, affinity = int(request["umask"]), int(request["nice"]), set(request["affinity"])
            limits = {name: (int(soft), int(hard)) for name, (soft, hard) in request["rlimits"].items()}
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise BadRequest(f"malformed request: {type(err).__name__}") from None
        if not (isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv) and isinstance(env, dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise BadRequest("malformed request: argv and env must be strings")
        if startup_env(env) != _ZYGOTE_STARTUP:
            raise BadRequest("the environment differs where it acts at start-up")
        try:
            os.umask(umask)
            os.setpriority(os.PRIO_PROCESS, 0, nice)
            os.sched_setaffinity(0, affinity)
            for name, value in limits.items():
                if not name.startswith("RLIMIT_") or not hasattr(resource, name):
                    raise BadRequest(f"unknown rlimit {name}")
                resource.setrlimit(getattr(resource, name), value)
            os.fchdir(fds[3])
            for target, fd in enumerate(fds[:3]):
                os.dup2(fd, target)
        except (OSError, ValueError) as err:  # e.g. a limit we cannot raise back: only the client has it
            raise BadRequest(f"cannot take the client's process state: {err}") from None
    finally:
        for fd in fds:
            os.close(fd)
    conn.settimeout(None)
    os.environ.clear()
    os.environ.update(env)
    _reopen_stdio()
    return argv


def _reopen_stdio() -> None:
    """sys.stdin/stdout/stderr on the client's descriptors, buffered as Python would have them
    (PYTHONUNBUFFERED included)."""
    encoding, errors = sys.stdout.encoding, sys.stdout.errors
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))

    def output(fd: int, errors: str, line_buffering: bool) -> io.TextIOWrapper:
        raw = open(fd, "wb", buffering=0 if unbuffered else -1, closefd=False)
        return io.TextIOWrapper(raw, encoding, errors, line_buffering=line_buffering, write_through=unbuffered)
    sys.stdin = sys.__stdin__ = open(0, encoding=encoding, errors=errors, closefd=False)
    sys.stdout = sys.__stdout__ = output(1, errors, os.isatty(1))
    sys.stderr = sys.__stderr__ = output(2, "backslashreplace", True)


def _install_spare(spare: Spare | None, report: int) -> None:
    """The launcher's SPARES: hand over `spare` when this run's fork-server would be started with
    its configuration (else it is closed, and exits); either way the zygote learns the run's."""
    from ..job import launcher

    def take(audit: str | None, env: dict[str, str]):
        nonlocal spare
        try:
            os.write(report, json.dumps([audit, env]).encode())
        except OSError:
            pass
        offered, spare = spare, None
        if offered is None:
            return None
        if offered.key == (audit, env) and offered.attributes == attributes():
            return offered.control, offered.process, offered.home
        offered.control.close()
        return None
    launcher.SPARES = take


def _relay(conn: socket.socket) -> None:
    """The client's signals, raised here; its end closing is a hang-up."""
    data = b""
    while True:
        try:
            chunk = conn.recv(256)
        except OSError:
            chunk = b""
        if not chunk:
            os.kill(os.getpid(), signal.SIGHUP)
            return
        data += chunk
        while b"\n" in data:
            line, data = data.split(b"\n", 1)
            words = line.split()
            if len(words) == 2 and words[0] == b"sig" and words[1].isdigit() and int(words[1]) in SIGNALS:
                os.kill(os.getpid(), int(words[1]))
        data = data[-256:]


def _committed(conn: socket.socket) -> bool:
    """Whether the client answers "go" to our "ok"."""
    conn.settimeout(RECEIVE_TIMEOUT)
    data = b""
    try:
        while len(data) < 3 and not data.endswith(b"\n"):
            chunk = conn.recv(3 - len(data))
            if not chunk:
                return False
            data += chunk
    except OSError:
        return False
    conn.settimeout(None)
    return data == b"go\n"


def _run_cli(argv: list[str]) -> int:
    """`sandbox.cli.main()` with `argv` as sys.argv: its exit status, as the interpreter would make it."""
    sys.argv = argv
    try:
        from ..cli import main
        main()
        code = 0
    except SystemExit as done:
        code = done.code
        if code is None:
            code = 0
        elif not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        import traceback
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - what an uncaught exception does to an interpreter
        import traceback
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code & 0xFF


def _send(conn: socket.socket, line: str) -> None:
    try:
        conn.sendall(line.encode())
    except OSError:
        pass
