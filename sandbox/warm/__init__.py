"""A per-user warm server for `taichi-sandbox run`, so that a run from a cold shell costs no more
than `python kernel.py`. Standard library only, up to `server`.

`client` (in the CLI's process) connects to the caller's server over a unix socket in a private
directory (`private_dir`), named by a stamp of the installed code and the caller's cgroups
(`stamp`: an upgrade gets a new server); when there is none it starts one and runs this run
in-process. `server` is a single-threaded zygote with the CLI's
modules imported and one fork-server started ahead (a spare); per request it forks a `worker`,
which takes the client's stdio, working directory, environment, argv, umask, nice value, CPU
affinity and rlimits and runs the ordinary CLI (`sandbox.cli`), so limits, verdicts, output and
exit codes are the in-process CLI's. Any failure before the worker runs the CLI: the client runs
it in-process itself. Off with TAICHI_SANDBOX_WARM=0; the server exits after
TAICHI_SANDBOX_WARM_IDLE seconds (default 600) without a request, or `taichi-sandbox warm stop`.

Wire format, on the connection (client → worker): 4-byte big-endian length + JSON request, with
SCM_RIGHTS [stdin, stdout, stderr, cwd] on its first bytes. Worker → client: "ok\\n" (ready;
nothing has happened yet) or "cold <why>\\n" (run in-process). Client → worker: "go\\n" (the
worker runs the CLI only then, so a client that gave up waiting never has its run done twice),
then "sig <n>\\n" per forwarded SIGINT/SIGTERM/SIGHUP. Worker → client: "exit <status>\\n".
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import sys

ENV_SWITCH, ENV_DIR, ENV_IDLE = "TAICHI_SANDBOX_WARM", "TAICHI_SANDBOX_WARM_DIR", "TAICHI_SANDBOX_WARM_IDLE"
DEFAULT_IDLE = 600.0
HEADER = struct.Struct("!I")
MAX_REQUEST = 1 << 20
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP")
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMESPACES = ("mnt", "pid", "net", "user", "ipc", "uts", "cgroup")  # a container's client: a server there
CREDENTIALS = (b"Uid:", b"Gid:", b"Groups:", b"Cap", b"NoNewPrivs:", b"Seccomp")  # the lines of /proc/self/status in a stamp


class Unsafe(OSError):
    """The socket directory is not private to this user."""


def private_dir() -> str:
    """The caller's socket directory, created 0700 when missing: $TAICHI_SANDBOX_WARM_DIR, else
    $XDG_RUNTIME_DIR/taichi-sandbox, else /tmp/taichi-sandbox-<uid>. Raises Unsafe unless it is a
    real directory (not a link) owned by this uid with no access for anyone else."""
    path = os.environ.get(ENV_DIR)
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if not path:
        path = os.path.join(runtime, "taichi-sandbox") if os.path.isabs(runtime) else \
            f"/tmp/taichi-sandbox-{os.geteuid()}"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise Unsafe(f"{path}: not a directory private to uid {os.geteuid()}")
    return path


def stamp() -> str:
    """What identifies a server: the code it runs (the interpreter, this package's files' paths,
    sizes and mtimes, the site-packages directory's mtime, which pip installs change), the cgroups
    and namespaces it runs in (a run's processes stay in its caller's: another login session, batch
    allocation or container gets a server of its own) and its credentials (ids, groups,
    capabilities, no_new_privs, seccomp: a run never gets more, or less, than its caller has)."""
    digest = hashlib.sha256(f"{sys.executable}\0{PACKAGE}\0{sys.version}".encode())
    with open("/proc/self/cgroup", "rb") as f:
        digest.update(f.read())
    with open("/proc/self/status", "rb") as f:
        digest.update(b"".join(line for line in f if line.startswith(CREDENTIALS)))
    for name in NAMESPACES:
        digest.update(os.readlink(f"/proc/self/ns/{name}").encode())
    for top, dirs, files in os.walk(PACKAGE):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith((".py", ".toml"))):
            info = os.stat(os.path.join(top, name))
            digest.update(f"\0{top}/{name}\0{info.st_size}\0{info.st_mtime_ns}".encode())
    site = os.path.join(sys.prefix, "lib", f"python{sys.version_info[0]}.{sys.version_info[1]}", "site-packages")
    try:
        digest.update(str(os.stat(site).st_mtime_ns).encode())
    except OSError:
        pass
    return digest.hexdigest()[:16]


def startup_env(env: dict[str, str]) -> dict[str, str]:
    """The variables that act when an interpreter starts or while the CLI's modules import (locale,
    the loader, malloc, typer's and rich's switches): a worker serves a client only when the
    server started with the same ones. PYTHON* variables are kept: a server (`python -I`) ignores
    them, so a client that sets one runs in-process."""
    keep = ("LANG", "TERMINAL_WIDTH", "TYPER_USE_RICH", "TYPER_STANDARD_TRACEBACK", "_TYPER_STANDARD_TRACEBACK",
            "_TYPER_FORCE_DISABLE_TERMINAL", "GITHUB_ACTIONS", "FORCE_COLOR", "PY_COLORS")
    harmless = ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED")  # the worker does as the latter says
    return {k: v for k, v in env.items()
            if k in keep or k.startswith(("LC_", "LD_", "MALLOC_")) or (k.startswith("PYTHON") and k not in harmless)}
