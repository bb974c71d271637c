"""The warm server: a single-threaded zygote with `sandbox.cli`'s modules imported and one spare
fork-server started ahead; it forks a `worker` per connection from its own uid.

Started by `sandbox.warm.client` as `python -I` (sandbox.job.interpreter) in a new session, with
the starting client's environment and working directory (which give the first spare's
configuration) and BLAS limited to one thread (it must never hold a thread: it forks). It holds
<dir>/<stamp>.lock for its lifetime (one server per stamp), listens on <dir>/<stamp>.sock (0600,
in a 0700 directory) and writes its pid to <dir>/<stamp>.pid. It exits on SIGTERM/SIGINT, after
$TAICHI_SANDBOX_WARM_IDLE seconds without a connection or a running worker, or when the installed
code no longer matches its stamp; its spare goes with it (a fork-server exits when its control
socket closes). Running workers are left to finish their runs.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time

from . import DEFAULT_IDLE, ENV_IDLE, private_dir, stamp
from .worker import Spare, attributes, serve

# sandbox.cli's imports, and what a run imports on its way (NVML, the system-call filter, typer's
# and rich's lazy parts); a missing one is skipped.
PRELOAD = ("sandbox.cli", "pynvml", "pyseccomp", "typer._adapters", "typer._click.decorators", "rich._emoji_codes",
           "email.parser")
STAMP_CHECK = 30.0  # seconds between checks that the installed code is still the stamp's


def _warm_up() -> tuple[str | None, dict[str, str]] | None:
    """Do ahead, in the starting client's directory and environment, what every run would do
    first (the namespace probe, the disk image template of its policy's default limit); the
    (audit log, base_env) of its fork-server, or None when its policy does not use one or does
    not load."""
    from ..core.audit import AuditLog
    from ..core.limits import Limits, load_policy
    from ..job import namespaces
    from ..job.disk import JobDisks
    from ..job.interpreter import base_env
    namespaces.probe()  # its pass is remembered for the workers (see namespaces.probe)
    try:
        policy = load_policy()
        JobDisks(policy.settings).prepare(policy.resolve(None, None, Limits()).disk)
    except Exception:  # noqa: BLE001 - the run itself reports a broken policy
        return None
    if policy.settings.launcher != "forkserver":
        return None
    return str(AuditLog(policy.settings.resolved_audit_log()).path), base_env()


def _start_spare(key: tuple[str | None, dict[str, str]] | None) -> Spare | None:
    from ..job.launcher import start_server
    if key is None:
        return None
    os.environ["PATH"] = key[1].get("PATH", os.environ.get("PATH", ""))  # base_env() takes PATH from here
    try:
        control, process, home = start_server(key[0])
    except Exception:  # noqa: BLE001 - no spare: runs start their own fork-server
        return None
    from ..job.interpreter import base_env
    return Spare(control, process, home, (key[0], base_env()), attributes())


def _core_free() -> bool:
    """Whether a spare may start beside a running job without slowing it: a core is idle (the load
    average is below the cores less one). Otherwise it starts once no run is left."""
    return os.getloadavg()[0] < (os.cpu_count() or 1) - 1


class Zygote:
    """The accept loop: `name` is its stamp, `lock` the descriptor holding its lock, `idle` how
    long it waits without work (an invalid $TAICHI_SANDBOX_WARM_IDLE gives the default)."""

    def __init__(self, name: str, listener: socket.socket, lock: int, idle: float) -> None:
        self.name, self.listener, self.lock, self.idle = name, listener, lock, idle
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w)
        self.stop = False
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self._stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, "accept")
        self.sel.register(self.wake_r, selectors.EVENT_READ, "signal")
        self.workers: dict[int, int | None] = {}  # pid -> the read end of its report pipe, until EOF
        self.key = _warm_up()
        self.spare = _start_spare(self.key)
        self.last = time.monotonic()

    def _stop(self, *_) -> None:
        self.stop = True

    def loop(self) -> None:
        checked = time.monotonic()
        while not self.stop:
            now = time.monotonic()
            if not self.workers and now - self.last >= self.idle:
                return
            if now - checked >= STAMP_CHECK:
                if stamp() != self.name:
                    return
                checked = now
            for key, _ in self.sel.select(min(STAMP_CHECK, max(0.0, self.idle - (now - self.last)) + 0.01)):
                if self.sel.get_map().get(key.fd) is not key:
                    continue  # a report pipe closed by an earlier event of this round
                if key.data == "accept":
                    self._accept()
                elif key.data == "signal":
                    os.read(self.wake_r, 4096)
                    self._reap()
                else:
                    self._report(key.fd)
            if self.spare is None and (not self.workers or _core_free()):
                self.spare = _start_spare(self.key)

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        _, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        if uid != os.geteuid():  # unreachable through a private directory; refused all the same
            conn.close()
            return
        self.last = time.monotonic()
        try:
            report_r, report_w = os.pipe()
        except OSError:
            conn.close()  # the client runs in-process
            return
        try:
            pid = os.fork()
        except OSError:
            for fd in (report_r, report_w):
                os.close(fd)
            conn.close()
            return
        if pid == 0:
            signal.set_wakeup_fd(-1)
            self.sel.close()
            for fd in (self.listener.fileno(), self.lock, self.wake_r, self.wake_w, report_r,
                       *(r for r in self.workers.values() if r is not None)):
                os.close(fd)
            serve(conn, self.spare, report_w)  # never returns
        conn.close()
        os.close(report_w)
        if self.spare is not None:
            self.spare.control.close()  # the worker's now
            self.spare = None
        os.set_blocking(report_r, False)
        self.workers[pid] = report_r
        self.sel.register(report_r, selectors.EVENT_READ, pid)

    def _report(self, fd: int) -> None:
        """A worker's fork-server configuration: the next spare gets it (the current one is
        replaced when it has another). At EOF the pipe is closed."""
        try:
            data = os.read(fd, 1 << 16)
            audit, env = json.loads(data) if data else (None, None)
        except BlockingIOError:
            return
        except (OSError, ValueError, TypeError):
            data, env = b"", None
        if not data:
            self.sel.unregister(fd)
            os.close(fd)
            self.workers.update({pid: None for pid, r in self.workers.items() if r == fd})
        if env is not None and (audit, env) != self.key:
            self.key = (audit, env)
            if self.spare is not None:
                self.spare.control.close()
                self.spare = None

    def _reap(self) -> None:
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.workers:
                fd = self.workers.pop(pid)
                if fd is not None:
                    self._report(fd)  # what it wrote before it ended
                    if fd in self.sel.get_map():
                        self.sel.unregister(fd)
                        os.close(fd)
                self.last = time.monotonic()


def main(argv: list[str]) -> None:
    ready, directory, name = int(argv[0]), argv[1], argv[2]
    try:
        idle = float(os.environ.get(ENV_IDLE, DEFAULT_IDLE))
    except ValueError:
        idle = DEFAULT_IDLE
    idle = idle if idle > 0 else DEFAULT_IDLE  # NaN and non-positive values too
    if os.fork() > 0:  # detach: the client's starter returns at once; we are reparented
        os._exit(0)
    if private_dir() != directory or stamp() != name:
        os._exit(0)
    lock = os.open(os.path.join(directory, f"{name}.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os._exit(0)  # another server has this stamp
    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    sys.modules.pop("sandbox.cli", None)  # each worker runs its body again, with the client's stdio and env
    path = os.path.join(directory, f"{name}.sock")
    try:
        os.unlink(path)  # one a server that died left (we hold the lock)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    os.fchmod(listener.fileno(), 0o600)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(64)
    zygote = Zygote(name, listener, lock, idle)
    os.chdir("/")
    pid_path = os.path.join(directory, f"{name}.pid")
    with open(pid_path, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        os.write(ready, b"ready\n")  # to `warm start`; a run's client does not wait
    except OSError:
        pass
    os.close(ready)
    try:
        zygote.loop()
    finally:
        for p in (path, pid_path):
            os.unlink(p)
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
