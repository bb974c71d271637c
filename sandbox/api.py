"""`run_kernel()`: the one-job convenience API over a process-wide default Supervisor."""

from __future__ import annotations

import atexit
import contextlib
import threading
import warnings
from typing import Any, Callable

from .core.limits import Limits
from .core.models import JobResult, JobSpec
from .node.supervisor import Supervisor
from .watch.echo import Echo


class FilesWarning(UserWarning):
    """Files a job was given or left that were not copied (a job's note, as a Python warning)."""


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

    Files as `taichi-sandbox run` handles them: `inputs=[...]` (files or directories, placed as
    sandbox.core.placement says); the files the job leaves are copied into `output_dir` (default:
    the current directory), new files only, those matching `outputs` (default ["*"]; [] copies
    none). What is not copied is named in the result's notes and in a FilesWarning.
    """
    if isinstance(limits, dict):
        limits = Limits(**limits)
    spec.setdefault("outputs", ["*"])
    if spec["outputs"] and spec.get("output_dir") is None:
        spec["output_dir"] = "."
    job = JobSpec(kernel=kernel, arch=arch, limits=limits or Limits(), profile=profile, tenant=tenant, **spec)
    with contextlib.nullcontext() if quiet else Echo() as echo:
        result = (supervisor or default_supervisor()).run(job, on_output=echo)
    for note in result.notes:
        if note.startswith(("WARNING: outputs:", "WARNING: inputs:")):
            warnings.warn(note.removeprefix("WARNING: "), FilesWarning, stacklevel=2)
    return result
