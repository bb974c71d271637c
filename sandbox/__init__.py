"""taichi-sandbox: run Taichi kernel jobs in supervised, resource-limited child processes.

The public names are imported lazily so that the job side (`sandbox.child`, `sandbox.forkserver`)
does not pay for the supervisor's imports.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ConfigError": "limits", "Limits": "limits", "Policy": "limits", "load_policy": "limits",
    "JobResult": "models", "JobSpec": "models", "Verdict": "models", "Violation": "models",
    "Supervisor": "supervisor", "run_kernel": "api", "SandboxError": "decorator", "sandboxed": "decorator",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'sandbox' has no attribute {name!r}")
