"""taichi-sandbox: run Taichi kernel jobs in supervised, resource-limited child processes.

The public names are imported lazily so that the job side (`sandbox.job.child`, `sandbox.job.forkserver`)
does not pay for the supervisor's imports.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ConfigError": "core.limits", "Limits": "core.limits", "Policy": "core.limits", "load_policy": "core.limits",
    "JobResult": "core.models", "JobSpec": "core.models", "Verdict": "core.models", "Violation": "core.models",
    "Supervisor": "node.supervisor", "run_kernel": "api", "FilesWarning": "api", "SandboxError": "decorator",
    "sandboxed": "decorator",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
