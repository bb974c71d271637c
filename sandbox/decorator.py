"""`sandboxed`: a function that runs in the sandbox each time it is called."""

from __future__ import annotations

import functools
from typing import Any, Callable

from .api import run_kernel
from .core.models import JobResult


class SandboxError(RuntimeError):
    """A sandboxed call whose verdict was not `ok`; `result` is its JobResult."""

    def __init__(self, result: JobResult) -> None:
        super().__init__(f"{result.kernel}: verdict {result.verdict.value}: {result.reason}")
        self.result = result


def sandboxed(fn: Callable | None = None, *, arch: str = "cpu", profile: str | None = None,
              tenant: str | None = None, quiet: bool = False, inputs: list = (), outputs: list[str] = ("*",),
              output_dir: str = ".", **limits: Any):
    """Decorator: each call of the function runs it in the sandbox (`run_kernel` with these limits,
    e.g. `memory="1GiB", cpu_time="10s"`, and files: `inputs`, `outputs`, `output_dir` as there)
    and returns its return value, or raises SandboxError. What the function prints appears as it
    runs (in a notebook, in the cell) unless `quiet=True`. Works with and without arguments:
    `@sandboxed` and `@sandboxed(memory="1GiB")`."""
    def decorate(func: Callable) -> Callable:
        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            files = dict(inputs=list(inputs), outputs=list(outputs), output_dir=output_dir if outputs else None)
            result = run_kernel(func, arch, limits, profile=profile, tenant=tenant, quiet=quiet,
                                args=list(args), kwargs=kwargs, **files)
            if not result.ok:
                raise SandboxError(result)
            return result.return_value
        return call
    return decorate(fn) if fn is not None else decorate
