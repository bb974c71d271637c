"""Arch resolution: which Taichi backends really initialise on this machine, probed out of process.

Probing happens in a throwaway interpreter because probing can crash the prober (OpenGL on headless
Mesa can segfault; `libcuda.so` without a device raises instead of falling back). Results are cached
for the life of the supervisor process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass

from .launcher import base_env

GPU_ORDER = ("cuda", "vulkan", "opengl", "metal")
PROBE_TIMEOUT = 120.0

_PROBE = """
import json, taichi as ti
from taichi._lib import core
try:
    ti.init(arch=getattr(ti, {arch!r}), enable_fallback=False, offline_cache=False)
    from taichi.lang import impl
    print(json.dumps({{"ok": True, "arch": core.arch_name(impl.current_cfg().arch)}}))
except Exception as e:
    print(json.dumps({{"ok": False, "reason": (type(e).__name__ + ": " + str(e)).splitlines()[0][:300]}}))
"""


@dataclass(frozen=True)
class ArchProbe:
    arch: str
    usable: bool
    reason: str


_cache: dict[str, ArchProbe] = {}
_lock = threading.Lock()


def probe(arch: str) -> ArchProbe:
    """Whether `ti.init(arch=...)` succeeds here, without risking this process. Cached."""
    with _lock:
        if arch in _cache:
            return _cache[arch]
    try:
        with tempfile.TemporaryDirectory(prefix="tsbx-probe-") as home:
            out = subprocess.run([sys.executable, "-c", _PROBE.format(arch=arch)], capture_output=True, text=True,
                                 timeout=PROBE_TIMEOUT, env={**base_env(), "HOME": home}, cwd=home,
                                 stdin=subprocess.DEVNULL)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if lines:
            data = json.loads(lines[-1])
            result = ArchProbe(arch, data["ok"], data.get("reason", f"initialised as {data.get('arch')}"))
        else:
            result = ArchProbe(arch, False, f"probe process died ({_status(out.returncode)})")
    except subprocess.TimeoutExpired:
        result = ArchProbe(arch, False, f"probe timed out after {PROBE_TIMEOUT:.0f}s")
    with _lock:
        _cache[arch] = result
    return result


def _status(returncode: int) -> str:
    if returncode < 0:
        import signal
        return signal.Signals(-returncode).name
    return f"exit status {returncode}"


class ArchUnavailable(Exception):
    """The requested arch cannot run here; the message is the reason for a `rejected` verdict."""


def resolve_arch(requested: str, allow_cpu_fallback: bool) -> tuple[str, str]:
    """(concrete arch, note). `gpu` → first usable of GPU_ORDER, else cpu if allowed."""
    if requested == "cpu":
        return "cpu", "cpu requested"
    if requested != "gpu":
        found = probe(requested)
        if not found.usable:
            raise ArchUnavailable(f"arch {requested} requested; {found.reason}")
        return requested, f"{requested} requested and usable"
    tried = []
    for arch in GPU_ORDER:
        found = probe(arch)
        if found.usable:
            return arch, f"gpu resolved to {arch}"
        tried.append(f"{arch}: {found.reason}")
    if allow_cpu_fallback:
        return "cpu", "gpu requested; no GPU backend usable, fell back to cpu (" + "; ".join(tried) + ")"
    raise ArchUnavailable("arch gpu requested; no GPU backend usable (" + "; ".join(tried) + ")")
