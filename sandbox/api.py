"""`run_kernel()`: the one-job convenience API over a process-wide default Supervisor."""

from __future__ import annotations

import atexit
import contextlib
import threading
from typing import Any, Callable

from .core.limits import Limits
from .core.models import JobResult, JobSpec
from .node.supervisor import Supervisor
from .terminal import Echo

_default: Supervisor | None = None
_default_lock = threading.Lock()


def default_supervisor() -> Supervisor:
    """The shared Supervisor (policy from $TAICHI_SANDBOX_LIMITS or ./limits.toml), created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Supervisor()
            atexit.register(_default.close)
        return _default


def run_kernel(kernel: str | Callable, arch: str = "cpu", limits: Limits | dict | None = None, *,
               profile: str | None = None, tenant: str | None = None,
               supervisor: Supervisor | None = None, quiet: bool = False, **spec: Any) -> JobResult:
    """Run one Taichi job to its verdict (blocking).

    `kernel` is a script path (run as __main__), `file.py:function` / `module:function` (called with
    `args=[...]`, `kwargs={...}`: JSON values and numpy arrays), or any callable (its args and kwargs
    anything picklable). `limits` override the profile from limits.toml. The return value comes back
    in `return_value`. The job's stdout and stderr appear on `sys.stdout` and `sys.stderr` as it
    writes them (in a notebook, in the running cell) unless `quiet`; either way the result keeps
    their tails (`stdout_tail`, `stderr_tail`). Raises ConfigError for an invalid spec or a
    callable that cannot be shipped; everything the job does becomes the verdict.
    """
    if isinstance(limits, dict):
        limits = Limits(**limits)
    job = JobSpec(kernel=kernel, arch=arch, limits=limits or Limits(), profile=profile, tenant=tenant, **spec)
    with contextlib.nullcontext() if quiet else Echo() as echo:
        return (supervisor or default_supervisor()).run(job, on_output=echo)
