"""Starting the job's child process without forking the supervisor.

Two launchers with one contract: `start(plan, stdout_w, stderr_w, channel_w) -> Launched`, where the
child runs `sandbox.job.child.execute` in a new session with the given pipes as stdout/stderr/channel.
- `ForkServerLauncher` (default): one exec'd server per supervisor with Taichi preloaded; a fork per job.
- `ExecLauncher` (fallback): a fresh `python -m sandbox.job.child` per job.
Both start their interpreter as sandbox.job.interpreter says: isolated, with a fixed environment.
`Launched.lease(deadline)` hands the job's cluster lease deadline to the fork-server, which enforces
it (and the plan's wall_time backstop) itself, even when the supervisor is frozen (sandbox.job.backstop);
with the exec launcher only the supervisor enforces them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import psutil

from ..core.limits import ConfigError
from . import backstop, forkserver, namespaces
from .child import ChildPlan
from .interpreter import ROOT_CWD, base_env, sandbox_module
from .safefs import remove_tree

JOB_MARKER = "TAICHI_SANDBOX_JOB"


@dataclass
class Exit:
    """How the child's top process ended (from wait4): exactly one of code/signal is set.
    `enforced`: the fork-server killed the job itself, for ("wall_time" or "lease", seconds after its
    fork) (sandbox.job.backstop)."""

    code: int | None
    signal: int | None
    cpu_seconds: float
    max_rss: int
    enforced: tuple[str, float] | None = None


def _exit_from_status(status: int, utime: float, stime: float, maxrss_kib: int) -> Exit:
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    return Exit(code, sig, utime + stime, maxrss_kib * 1024)


class LauncherLost(RuntimeError):
    """The fork-server died while a job ran: the job's exit status cannot be known."""


class LaunchFailed(RuntimeError):
    """The job could not be started (the launcher is unreachable or did not answer)."""


class Launched:
    """A started child: its pid, how many of the sandbox's own processes stand above the job
    (`helpers`: see sandbox.watch.tree.JobTree) and a blocking `wait()`."""

    pid: int
    helpers: int = 0

    def wait(self) -> Exit:  # pragma: no cover - interface
        raise NotImplementedError

    def lease(self, deadline: float | None) -> None:
        """Set, extend or clear the job's lease deadline (absolute CLOCK_MONOTONIC seconds) where
        the launcher enforces it; thread-safe, never raises. Here (exec): nothing does."""


class _ExecLaunched(Launched):
    def __init__(self, proc: subprocess.Popen, helpers: int) -> None:
        self.pid, self.helpers = proc.pid, helpers
        self._proc = proc

    def wait(self) -> Exit:
        _, status, usage = os.wait4(self.pid, 0)
        self._proc.returncode = -1  # reaped by us; keep Popen from waiting again
        return _exit_from_status(status, usage.ru_utime, usage.ru_stime, usage.ru_maxrss)


class ExecLauncher:
    """A fresh interpreter per job: slower start (imports Taichi each time), nothing shared.

    It does not make the supervisor a subreaper (that would leave zombies of unrelated subprocess
    trees in the host application); a job's orphans go to init and are found by their marker.
    """

    name = "exec"

    def helpers(self, isolate: bool) -> int:
        """How many of the sandbox's own processes will be in an `isolate`d job's cgroup: the
        child relays itself (relay and init)."""
        return namespaces.HELPERS if isolate else 0

    def orphans(self, job_id: str, running: set[int]) -> list[psutil.Process]:
        """Every process on the machine whose exec-time environment carries this job's marker."""
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid not in running and proc.environ().get(JOB_MARKER) == job_id:
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def start(self, plan: ChildPlan, stdout_w: int, stderr_w: int, channel_w: int) -> Launched:
        """The child starts as root outside the job's directories and without the job's environment
        (it applies both itself, once confined): nothing of the job's runs before that."""
        plan_r, plan_w = os.pipe()
        plan = plan.model_copy(update={"parent_pid": os.getpid()})
        proc = subprocess.Popen(
            sandbox_module("sandbox.job.child", str(plan_r), str(channel_w)),
            stdin=subprocess.DEVNULL, stdout=stdout_w, stderr=stderr_w, pass_fds=(plan_r, channel_w),
            env={**base_env(), JOB_MARKER: plan.job_id}, cwd=ROOT_CWD, start_new_session=True)
        os.close(plan_r)
        with os.fdopen(plan_w, "wb") as f:
            f.write(plan.model_dump_json().encode())
        return _ExecLaunched(proc, self.helpers(plan.isolate))

    def close(self) -> None:
        pass


# Where a launcher first looks for a fork-server already started: None, or a callable
# (audit, base_env()) -> what `start_server(audit)` returns, for a server started with exactly that
# configuration, or None (sandbox.warm's server keeps one spare).
SPARES: Callable[[str | None, dict[str, str]], tuple[socket.socket, psutil.Process, str] | None] | None = None


def start_server(audit: str | None) -> tuple[socket.socket, psutil.Process, str]:
    """Start (by exec) a fork-server: (our end of its control socket, its process, its cwd and HOME,
    which it removes itself when it exits). `audit`: see `ForkServerLauncher`."""
    home = tempfile.mkdtemp(prefix="tsbx-fs-")
    control, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid_r, pid_w = os.pipe()
    fds = (theirs.fileno(), pid_w)
    try:
        starter = subprocess.Popen(
            sandbox_module("sandbox.job.forkserver", *map(str, fds), *([audit] if audit else [])),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=fds,
            env={**base_env(), "HOME": home}, cwd=home, start_new_session=True)
    except BaseException:
        os.close(pid_r)
        control.close()
        remove_tree(home)
        raise
    finally:
        theirs.close()
        os.close(pid_w)
    starter.wait()  # the server detaches itself (see forkserver.detach) and reports its pid
    with os.fdopen(pid_r, "rb") as f:
        pid = f.readline().strip()
    if not pid:
        control.close()
        remove_tree(home)
        raise LaunchFailed("the fork-server failed to start")
    return control, psutil.Process(int(pid)), home


class _ForkLaunched(Launched):
    def __init__(self, conn: socket.socket, timeout: float, launcher: "ForkServerLauncher", job_id: str) -> None:
        self._file = conn.makefile("rb")
        self._conn = conn
        self._launcher, self._job_id = launcher, job_id
        conn.settimeout(timeout)
        try:
            line = self._file.readline().split()
        except OSError:
            line = []
        if len(line) != 3 or line[0] != b"pid":
            self._file.close()
            conn.close()
            raise LaunchFailed(f"the fork-server did not start the job within {timeout:g} s")
        conn.settimeout(None)
        self.pid, self.helpers = int(line[1]), int(line[2])

    def wait(self) -> Exit:
        line = self._file.readline().split()
        enforced = None
        if len(line) == 3 and line[0] == b"killed" and line[1].decode() in backstop.KINDS:
            enforced = (line[1].decode(), float(line[2]))
            line = self._file.readline().split()
        self._file.close()
        self._conn.close()
        if len(line) != 5 or line[0] != b"exit":
            raise LauncherLost("fork-server died before the job ended")
        return replace(_exit_from_status(int(line[1]), float(line[2]), float(line[3]), int(line[4])),
                                   enforced=enforced)

    def lease(self, deadline: float | None) -> None:
        self._launcher.lease(self._job_id, self.pid, deadline)


class ForkServerLauncher:
    """Starts (lazily, by exec) one fork-server with Taichi preloaded and asks it for each child,
    over a socketpair only the two of them hold (see sandbox.job.forkserver)."""

    name = "forkserver"
    start_timeout = 10.0  # seconds for the server to answer a request with the job's pid

    def __init__(self, audit: str | None = None) -> None:
        """`audit`: the supervisor's audit log, where the server records the jobs it kills when the
        supervisor dies under them (`aborted`)."""
        self.audit = audit
        self._lock = threading.Lock()
        self._server: psutil.Process | None = None
        self._dir: str | None = None  # the server's cwd and HOME; it removes it itself when it exits
        self._control: socket.socket | None = None

    def helpers(self, isolate: bool) -> int:
        """How many of the sandbox's own processes will be in an `isolate`d job's cgroup: a root
        server relays itself, so only the init is (see forkserver.serve); else relay and init. A
        root server that could not make a network namespace relays nothing and its jobs get one
        process fewer than asked, never one more."""
        return (1 if os.geteuid() == 0 else namespaces.HELPERS) if isolate else 0

    def _server_alive(self) -> bool:
        try:
            return self._server is not None and self._server.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _ensure_server(self) -> None:
        """Start the server if it is not running; wake it if something stopped it. Call with the lock held."""
        if self._server_alive():
            if self._server.status() == psutil.STATUS_STOPPED:
                self._server.resume()
            return
        self._close()
        spare = SPARES(self.audit, base_env()) if SPARES is not None else None
        self._control, self._server, self._dir = spare or start_server(self.audit)

    def start(self, plan: ChildPlan, stdout_w: int, stderr_w: int, channel_w: int) -> Launched:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        request = forkserver.encode_request(plan.model_dump_json().encode())
        try:
            with self._lock:
                self._ensure_server()
                sent = socket.send_fds(self._control, [request], [stdout_w, stderr_w, channel_w, theirs.fileno()])
                self._control.sendall(request[sent:])
        except OSError as err:
            mine.close()
            raise LaunchFailed(f"cannot reach the fork-server: {err}") from None
        finally:
            theirs.close()
        return _ForkLaunched(mine, self.start_timeout, self, plan.job_id)

    def lease(self, job_id: str, pid: int, deadline: float | None) -> None:
        """Tell the server the lease deadline of job `job_id` at `pid` (see `forkserver.encode_lease`);
        nothing when no server runs (never starts one); never raises: the supervisor enforces the
        lease too."""
        message = forkserver.encode_lease(job_id, pid, deadline)
        with self._lock:
            if self._control is None:
                return
            try:
                self._control.sendall(message)
            except OSError:
                pass

    @property
    def server_pid(self) -> int | None:
        return self._server.pid if self._server is not None else None

    def orphans(self, job_id: str, running: set[int]) -> list[psutil.Process]:
        """The server's children that are not a running job's main process, with their descendants:
        the server is their subreaper, so these are what finished jobs left behind. Call with
        launches serialized."""
        try:
            tops = [p for p in psutil.Process(self.server_pid).children() if p.pid not in running]
        except (psutil.Error, ValueError, TypeError):
            return []
        found = list(tops)
        for top in tops:
            try:
                found += top.children(recursive=True)
            except psutil.Error:
                continue
        return found

    def close(self) -> None:
        """Stop the server (its jobs' process groups are killed)."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self._control is not None:
            self._control.close()  # the server sees EOF, kills its jobs and exits
            self._control = None
        if self._server is not None:
            deadline = time.monotonic() + 5
            while self._server_alive() and time.monotonic() < deadline:
                time.sleep(0.01)  # not our child (it detached): poll; a zombie counts as gone
            if self._server_alive():
                self._server.kill()
            self._server = None
        if self._dir is not None:
            remove_tree(self._dir)  # the server's own removal may have raced us
            self._dir = None


class NestedSandbox(ConfigError):
    """A sandbox was started inside a sandboxed job."""


def make_launcher(name: str, audit: str | None = None):
    """'forkserver' (recording in `audit` the jobs it kills when the supervisor dies) or 'exec'.
    Raises NestedSandbox inside a job (its environment has JOB_MARKER): a script run as
    `file.py:function` runs its top level again in the job, and one without a main guard would
    start sandboxes inside sandboxes."""
    if os.environ.get(JOB_MARKER):
        raise NestedSandbox(f"a sandbox cannot be started inside a sandboxed job ({JOB_MARKER} is set): put the "
                            "script's top-level code that runs jobs under `if __name__ == '__main__':`")
    return ForkServerLauncher(audit) if name == "forkserver" else {"exec": ExecLauncher}[name]()
