"""Arch resolution: which Taichi backends really initialise on this machine, probed out of process.

Probing happens in a throwaway interpreter because probing can crash the prober (OpenGL on headless
Mesa can segfault; `libcuda.so` without a device raises instead of falling back). Results are cached
for the life of the supervisor process.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
import threading
from dataclasses import dataclass

from ..job.interpreter import base_env, python

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
            out = subprocess.run(python("-c", _PROBE.format(arch=arch)), capture_output=True, text=True,
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


# --- GPU memory: NVML sampling behind a small interface ---------------------------------------------


@dataclass(frozen=True)
class GpuDevice:
    index: int
    uuid: str
    name: str
    memory_total: int


class GpuUnavailable(Exception):
    """The GPU sampler cannot answer; the message says why (no library, no driver, not supported)."""


class GpuSampler:
    """What the monitor needs from a GPU driver. `NvmlSampler` is the real one; tests script their own.

    Every method raises GpuUnavailable (never anything else) when it cannot answer.
    """

    name = "gpu"

    def open(self) -> None:
        """Initialise; raise GpuUnavailable with the reason when there is no usable GPU driver."""

    def driver(self) -> str:
        raise GpuUnavailable("no driver")

    def devices(self) -> list[GpuDevice]:
        return []

    def used_by(self, device: GpuDevice) -> dict[int, int | None]:
        """Host pid -> bytes of device memory used (None when the driver does not say)."""
        return {}

    def utilization(self, device: GpuDevice) -> int | None:
        return None


class NvmlSampler(GpuSampler):
    """NVML through nvidia-ml-py (`pynvml`). Host pids, as NVML reports them."""

    name = "nvml"

    def __init__(self) -> None:
        self._nvml = None
        self._handles: dict[int, object] = {}

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._nvml.NVMLError as err:
            raise GpuUnavailable(f"NVML: {err}") from None

    def open(self) -> None:
        if self._nvml is not None:
            return
        try:
            import pynvml
        except ImportError as err:
            raise GpuUnavailable(f"nvidia-ml-py not installed: {err}") from None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            raise GpuUnavailable(f"no NVML: {err}") from None
        self._nvml = pynvml

    def driver(self) -> str:
        value = self._call(self._nvml.nvmlSystemGetDriverVersion)
        return value.decode() if isinstance(value, bytes) else str(value)

    def devices(self) -> list[GpuDevice]:
        out = []
        for index in range(self._call(self._nvml.nvmlDeviceGetCount)):
            handle = self._call(self._nvml.nvmlDeviceGetHandleByIndex, index)
            self._handles[index] = handle
            uuid, name = (self._call(f, handle) for f in (self._nvml.nvmlDeviceGetUUID, self._nvml.nvmlDeviceGetName))
            memory = self._call(self._nvml.nvmlDeviceGetMemoryInfo, handle)
            out.append(GpuDevice(index, _text(uuid), _text(name), int(memory.total)))
        return out

    def used_by(self, device: GpuDevice) -> dict[int, int | None]:
        procs = self._call(self._nvml.nvmlDeviceGetComputeRunningProcesses, self._handles[device.index])
        return {int(p.pid): (int(p.usedGpuMemory) if p.usedGpuMemory is not None else None) for p in procs}

    def utilization(self, device: GpuDevice) -> int | None:
        return int(self._call(self._nvml.nvmlDeviceGetUtilizationRates, self._handles[device.index]).gpu)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_devices(devices: list[GpuDevice], cuda_visible: str | None) -> list[GpuDevice]:
    """The devices a job with this CUDA_VISIBLE_DEVICES can use (indices or UUID prefixes; CUDA
    stops at the first invalid entry). None (unset) means all."""
    if cuda_visible is None:
        return list(devices)
    chosen: list[GpuDevice] = []
    for entry in (e.strip() for e in cuda_visible.split(",")):
        match = [d for d in devices if (entry.isdigit() and d.index == int(entry))
                 or (entry.startswith(("GPU-", "MIG-")) and d.uuid.startswith(entry))]
        if not match:
            break
        chosen.append(match[0])
    return chosen


def host_pid(pid: int, proc_root: str = "/proc") -> int:
    """The pid as NVML sees it: the outermost NSpid entry of /proc/PID/status (the same pid when the
    supervisor is not looking into a nested PID namespace)."""
    try:
        with open(f"{proc_root}/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return pid


@dataclass
class GpuReading:
    used: int | None
    utilization: int | None
    unknown_pids: int = 0


class GpuWatch:
    """Per-job GPU memory reading: sums what the job's processes use on the job's devices."""

    def __init__(self, sampler: GpuSampler, devices: list[GpuDevice], proc_root: str = "/proc") -> None:
        self.sampler, self.devices, self.proc_root = sampler, devices, proc_root
        self.failure: str | None = None

    def read(self, pids: list[int]) -> GpuReading | None:
        """None once the driver has failed (the reason stays in `failure`); never raises."""
        if self.failure is not None:
            return None
        wanted = {host_pid(pid, self.proc_root) for pid in pids}
        used, unknown, util = 0, 0, None
        try:
            for device in self.devices:
                for pid, value in self.sampler.used_by(device).items():
                    if pid in wanted:
                        if value is None:
                            unknown += 1
                        else:
                            used += value
                try:
                    u = self.sampler.utilization(device)
                    util = u if util is None or (u is not None and u > util) else util
                except GpuUnavailable:
                    pass
        except GpuUnavailable as err:
            self.failure = str(err)
            return None
        return GpuReading(used, util, unknown)


# --- MPS: a hard device-memory cap enforced by the driver ------------------------------------------

MPS_DEFAULT_PIPE_DIRECTORY = "/tmp/nvidia-mps"


def mps_pipe_directory(env: dict[str, str]) -> str | None:
    """The MPS control daemon's pipe directory when a daemon is reachable there, else None."""
    directory = env.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_DEFAULT_PIPE_DIRECTORY
    try:
        mode = os.stat(os.path.join(directory, "control")).st_mode
    except OSError:
        return None
    return directory if stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode) else None


def mps_env(pipe_directory: str, limit_bytes: int, ordinals: int) -> dict[str, str]:
    """Environment asking MPS to cap each visible device ordinal at `limit_bytes` for this client."""
    mib = max(1, limit_bytes // (1 << 20))
    pinned = ",".join(f"{i}={mib}M" for i in range(max(ordinals, 1)))
    return {"CUDA_MPS_PIPE_DIRECTORY": pipe_directory, "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": pinned}
