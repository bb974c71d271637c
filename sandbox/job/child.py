"""The job side: runs inside the sandboxed child process, never in the supervisor.

Order matters and is the contract: join the job cgroup (before anything else runs, so everything the
job does is counted) → oom_score_adj JOB_OOM_SCORE_ADJ (the kernel's first choice; written while
still root, which also makes it the floor the job cannot lower it below again) → die with the parent
(PR_SET_PDEATHSIG) → own session → subreaper → rlimits
→ the work dir as cwd → with isolation, new namespaces, a relay outside, an init inside and the
tenant's uid (sandbox.job.namespaces) → the job's scrubbed environment (only now: nothing that runs
as root sees it) → the system-call filter (sandbox.job.syscalls) → guarded `ti.init` → run the job (a shipped
callable is unpickled here, sandbox.core.shipping) → write its return value (sandbox.job.results) → report
one JSON result on the channel → `ti.reset()` (writes the offline cache) → `os._exit`.

Everything here helps honest jobs and reports truthfully; a hostile job can undo any of it, which is
why every limit is also enforced from the supervisor.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import sys
import tempfile
import traceback
from typing import Any

from pydantic import BaseModel

from ..core import channel
from ..core.models import Shipped
from ..core.values import wire
from . import results, syscalls
from ..core.shipping import receive

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
JOB_OOM_SCORE_ADJ = 500  # jobs go first when the kernel must kill (the service and fork-server stand below 0)

# Taichi config the job may not change: the supervisor's value always wins.
FORCED_TI_KEYS = ("offline_cache_file_path",)
# TI_* variables the job may not use to override ti.init (every config field has one).
ALLOWED_TI_ENV = ("TI_SKIP_VERSION_CHECK",)

RLIMITS = {
    "cpu": resource.RLIMIT_CPU,
    "as": resource.RLIMIT_AS,
    "nofile": resource.RLIMIT_NOFILE,
    "fsize": resource.RLIMIT_FSIZE,
    "core": resource.RLIMIT_CORE,
}


class ChildPlan(BaseModel):
    """What the supervisor hands the child (trusted direction only)."""

    job_id: str
    target: str
    function: str | None = None
    shipped: Shipped | None = None  # a callable with its args (then target/function only name it)
    args: wire(list[Any], check=False) = []
    kwargs: wire(dict[str, Any], check=False) = {}
    argv: list[str] = []
    ti_arch: str
    ti_caps: dict[str, Any] = {}
    rlimits: dict[str, tuple[int, int]] = {}
    env: dict[str, str] = {}
    workdir: str
    parent_pid: int
    preinit: bool = False
    isolate: bool = False  # new PID, mount, IPC, UTS (and network) namespaces: see sandbox.job.namespaces
    netns_fd: int | None = None  # a fresh network namespace the fork-server had ready (its fd here)
    status_fd: int | None = None  # the fork-server relays: this is PID 1 of a new PID namespace (namespaces.enter)
    uid: int | None = None  # the tenant's ids the job runs as (only with isolate)
    gid: int | None = None
    expose: list[tuple[str, bool]] = []  # (path, writable) the job needs besides the interpreter
    network: str = "none"
    read_only: bool = False  # every mount but the job's own dirs, tmpfs and /proc remounted read-only
    tmpfs_bytes: int | None = None
    cgroup_join: list[str] = []  # files the child writes "0" to, to join its job cgroup (JobCgroup.join_files)
    max_result: int | None = None  # bytes of result files (sandbox.job.results)
    syscall_filter: bool = False  # install the system-call filter before the job runs (sandbox.job.syscalls)
    # The fork-server's own deadlines (sandbox.job.backstop): seconds after the fork (wall_time + grace +
    # slack), and the cluster lease's end (absolute CLOCK_MONOTONIC seconds) at the launch.
    backstop: float | None = None
    lease: float | None = None


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}) failed")


def set_oom_score_adj(value: int) -> str | None:
    """Set this process's /proc/self/oom_score_adj (inherited by its children); None, or why not
    (lowering it needs CAP_SYS_RESOURCE; a write with that capability also sets the floor below which
    the process, and every process it forks, cannot lower it without the capability)."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(value))
    except OSError as err:
        return f"cannot set oom_score_adj {value}: {err.strerror}" + (
            " (lowering it needs CAP_SYS_RESOURCE)" if err.errno == errno.EACCES else "")
    return None


def confine(plan: ChildPlan) -> None:
    """Apply everything that must hold before job code runs. Exits at once if the parent is gone."""
    if plan.cgroup_join and len(os.listdir("/proc/self/task")) != 1:
        raise RuntimeError("the child must be single-threaded to join its job cgroup")
    for path in plan.cgroup_join:
        with open(path, "w") as f:
            f.write("0")
    set_oom_score_adj(JOB_OOM_SCORE_ADJ)  # raising needs no privilege: only an inherited higher value stays
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != plan.parent_pid:
        os._exit(70)
    if os.getpid() != os.getpgid(0):
        os.setsid()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    for name, (soft, hard) in plan.rlimits.items():
        resource.setrlimit(RLIMITS[name], (soft, hard))
    os.chdir(plan.workdir)


def _apply_env(plan: ChildPlan) -> None:
    """The job's environment replaces the launcher's: call it in the job's process, once confined."""
    os.environ.clear()
    os.environ.update(plan.env)
    tempfile.tempdir = None  # a fork-server child inherits the server's cached temp dir


def _scrub_ti_env() -> list[str]:
    """Remove TI_* overrides the job set (TI_ARCH beats ti.init's arch=); returns their names."""
    names = [n for n in os.environ if n.startswith("TI_") and n not in ALLOWED_TI_ENV]
    for name in names:
        del os.environ[name]
    return names


def _clamp(kwargs: dict, caps: dict) -> list[str]:
    """Clamp the job's ti.init keywords to the supervisor's caps in place; names what was clamped."""
    clamped = []
    for key, cap in caps.items():
        wanted = kwargs.get(key)
        if key in FORCED_TI_KEYS:
            if wanted is not None and wanted != cap:
                clamped.append(key)
            kwargs[key] = cap
        elif wanted is None or not isinstance(wanted, (int, float)) or wanted > cap or wanted <= 0:
            if wanted is not None:
                clamped.append(key)
            kwargs[key] = cap
    return clamped


def guard_ti_init(plan: ChildPlan, channel_fd: int) -> None:
    """Replace `ti.init` so every call keeps the supervisor's arch and caps, and reports settings."""
    import taichi as ti
    import taichi.lang.misc as misc
    from taichi._lib import core as ti_core
    from taichi.lang import impl

    real_init = misc.init
    arch = getattr(ti, plan.ti_arch)

    def init(arch_requested=None, *args, **kwargs):
        arch_requested = kwargs.pop("arch", arch_requested)
        requested = {k: repr(v)[:100] for k, v in kwargs.items()}
        requested["arch"] = str(arch_requested)
        kwargs.pop("enable_fallback", None)
        ti_env = _scrub_ti_env()
        clamped = _clamp(kwargs, plan.ti_caps)
        if arch_requested is not None and arch_requested != arch:
            clamped.insert(0, "arch")
        clamped.extend(f"env {name}" for name in ti_env)
        value = real_init(arch, *args, enable_fallback=False, **kwargs)
        cfg = impl.current_cfg()
        effective = {"arch": ti_core.arch_name(cfg.arch)}
        for key in ("device_memory_GB", "device_memory_fraction", "cpu_max_num_threads",
                    "offline_cache", "offline_cache_file_path", "debug"):
            effective[key] = getattr(cfg, key)
        channel.send(channel_fd, {"type": "ti_init", "requested": requested,
                                  "effective": effective, "clamped": clamped})
        return value

    init.__doc__ = real_init.__doc__
    misc.init = init
    ti.init = init


def _on_sigxcpu(channel_fd: int):
    def handler(signum, frame):
        channel.send(channel_fd, {"type": "rlimit", "resource": "cpu_time",
                                  "detail": "RLIMIT_CPU soft limit reached (SIGXCPU)"})
        os._exit(128 + signum)
    return handler


def _run_job(plan: ChildPlan) -> Any:
    import runpy
    if plan.preinit or plan.shipped is not None:
        import taichi as ti
        ti.init()
    if plan.shipped is not None:
        func, args, kwargs = receive(plan.shipped)
        return func(*args, **kwargs)
    if plan.function is None or plan.target.endswith(".py"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(plan.target)))  # as `python FILE` does
    if plan.function is None:
        sys.argv = [plan.target, *plan.argv]
        runpy.run_path(plan.target, run_name="__main__")
        return None
    if plan.target.endswith(".py"):
        namespace = runpy.run_path(plan.target, run_name="__sandbox_job__")
    else:
        import importlib
        namespace = vars(importlib.import_module(plan.target))
    func = namespace.get(plan.function)
    if not callable(func):
        raise AttributeError(f"{plan.target} has no function {plan.function!r}")
    return func(*plan.args, **plan.kwargs)


def _error(err: BaseException, exit_code: int = 1) -> dict:
    return {"type": "result", "status": "error", "exit_code": exit_code,
            "error_type": type(err).__name__, "error_message": str(err)[:8000],
            "traceback": "".join(traceback.format_exception(err))[-64000:]}


def _reset_taichi() -> None:
    """Write the offline cache (Taichi only does it at exit, which os._exit skips)."""
    ti = sys.modules.get("taichi")
    if ti is not None:
        try:
            ti.reset()
        except Exception:  # noqa: BLE001 - the job's result is already decided
            pass


def _report_leftovers(channel_fd: int, count: int) -> None:
    channel.send(channel_fd, {"type": "leftovers", "count": count})


def execute(plan: ChildPlan, channel_fd: int) -> None:
    """Confine, run the job, report, exit. Never returns."""
    try:
        confine(plan)
        if plan.isolate:
            from . import namespaces
            namespaces.enter(plan.network, plan.tmpfs_bytes, channel_fd, _report_leftovers, plan.netns_fd,
                             (plan.uid, plan.gid) if plan.uid is not None else None, plan.expose, plan.status_fd,
                             plan.read_only, plan.cgroup_join)
            os.chdir(plan.workdir)  # through the new mounts: the old cwd's ".." leads to the host's /tmp
        elif plan.netns_fd is not None:
            os.close(plan.netns_fd)  # the fork-server's ready network namespace, not wanted here
        _apply_env(plan)
        if plan.syscall_filter:
            syscalls.install()  # after the namespaces and the uid switch, before any of the job's code
        signal.signal(signal.SIGXCPU, _on_sigxcpu(channel_fd))
        guard_ti_init(plan, channel_fd)
    except BaseException as err:  # noqa: BLE001 - reported, then the child ends
        channel.send(channel_fd, _error(err))
        os._exit(71)
    exit_code = 0
    try:
        value = _run_job(plan)
        message = {"type": "result", "status": "ok",
                   "result_bytes": results.write(value, plan.workdir, plan.max_result)}
    except SystemExit as err:
        code = err.code if isinstance(err.code, int) else (0 if err.code is None else 1)
        if code == 0:
            message = {"type": "result", "status": "ok", "exit_code": 0}
        else:
            message = _error(err, code)
            message["error_message"] = f"exit status {code}" + (f": {err.code}" if not isinstance(err.code, int) else "")
        exit_code = code
    except MemoryError as err:
        channel.send(channel_fd, {"type": "rlimit", "resource": "address_space", "detail": "MemoryError"})
        message, exit_code = _error(err), 1
    except BaseException as err:  # noqa: BLE001 - every job failure becomes a verdict
        message, exit_code = _error(err), 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    channel.send(channel_fd, message)
    _reset_taichi()
    os._exit(exit_code & 0xFF)


def main() -> None:
    """`python -m sandbox.job.child PLAN_FD CHANNEL_FD`: the exec launcher's entry point."""
    plan_fd, channel_fd = int(sys.argv[1]), int(sys.argv[2])
    with os.fdopen(plan_fd, "rb") as f:
        plan = ChildPlan.model_validate_json(f.read())
    if plan.syscall_filter:
        syscalls.prepare()  # built before the job's process is confined; there it is only loaded
    execute(plan, channel_fd)


if __name__ == "__main__":
    main()
