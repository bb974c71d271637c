"""How the supervisor's side starts Python (the exec launcher's child, the fork-server, the probes).

These interpreters run as root before any job is confined, so they import only from the
interpreter's own installation and from the `sandbox` package this process runs: isolated mode
(`-I`: neither the working directory nor a script's directory goes on `sys.path`, `PYTHON*`
variables and the user site directory are ignored), a fixed environment chosen here (never a
client's or a job's: `LD_PRELOAD` and the like act before Python starts) and a working directory
no one else writes. A job's own environment is applied inside the child, after its uid switch.
"""

from __future__ import annotations

import os
import sys

ROOT_CWD = "/"  # where an interpreter that needs no directory of its own starts

# `python -m MODULE ARGS` with `sandbox` loaded from PACKAGE, the directory this process imported it
# from (a checkout or site-packages), so the child runs the same code; no directory joins sys.path.
_BOOT = """import importlib.util, runpy, sys
package, module = sys.argv[1:3]
del sys.argv[1:3]
spec = importlib.util.spec_from_file_location("sandbox", package + "/__init__.py", submodule_search_locations=[package])
sys.modules["sandbox"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sys.modules["sandbox"])
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this `sandbox` package's directory


def base_env() -> dict[str, str]:
    """The environment every interpreter the sandbox starts begins with, and the base of a job's
    (the job's scrubbed env comes on top, inside the child). Read when a process starts, so in force
    for the job too: at most two malloc arenas and a single-threaded OpenBLAS (numpy is loaded
    before the job runs), which keep a job's address space small under RLIMIT_AS."""
    return {"TI_SKIP_VERSION_CHECK": "ON", "ENABLE_TAICHI_HEADER_PRINT": "0", "PYTHONDONTWRITEBYTECODE": "1",
            "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def python(*args: str) -> list[str]:
    """The command line of an isolated interpreter (`-B`: writes no bytecode, as
    PYTHONDONTWRITEBYTECODE, which `-I` ignores, did)."""
    return [sys.executable, "-I", "-B", *args]


def sandbox_module(module: str, *args: str) -> list[str]:
    """The command line running `module` of this package as `python -m` would, isolated, with
    this process's own `sandbox`."""
    return python("-c", _BOOT, PACKAGE, module, *args)
