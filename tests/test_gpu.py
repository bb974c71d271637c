"""GPU awareness: arch resolution and real jobs on Vulkan (Mesa lavapipe), and the NVML watchdog.

NVML needs an NVIDIA GPU, which these machines lack: tests named `simulated_nvml` drive the real
supervisor, monitor and GpuWatch with a scripted sampler; the real NvmlSampler runs where the library
loads and is skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import threading

import psutil
import pytest

from sandbox import JobSpec, Limits, Supervisor, Verdict
from sandbox.watch.gpu import (GpuDevice, GpuSampler, GpuUnavailable, GpuWatch, NvmlSampler, host_pid, mps_env,
                         mps_pipe_directory, probe, visible_devices)
from sandbox.core.limits import MiB

from .conftest import assert_no_survivors, kernel, make_policy, run

vulkan = pytest.mark.skipif(not probe("vulkan").usable,
                            reason=f"no Vulkan driver here: {probe('vulkan').reason} "
                                   "(make test installs mesa-vulkan-drivers)")

DEV0 = GpuDevice(0, "GPU-aaaa-0000", "Simulated A100", 1 << 30)
DEV1 = GpuDevice(1, "GPU-bbbb-1111", "Simulated A100", 1 << 30)


class ScriptedSampler(GpuSampler):
    """A fake driver: every read, each process of the job on `on_device` uses `step` more bytes."""

    name = "scripted"

    def __init__(self, supervisor_ref: list, step: int | None = 100 * MiB, on_device: int = 0,
                 fail_with: str | None = None, open_error: str | None = None) -> None:
        self.sup, self.step, self.on_device = supervisor_ref, step, on_device
        self.fail_with, self.open_error = fail_with, open_error
        self.reads = 0
        self.lock = threading.Lock()

    def open(self) -> None:
        if self.open_error:
            raise GpuUnavailable(self.open_error)

    def driver(self) -> str:
        return "555.42 (simulated)"

    def devices(self) -> list[GpuDevice]:
        return [DEV0, DEV1]

    def used_by(self, device: GpuDevice) -> dict[int, int | None]:
        if self.fail_with:
            raise GpuUnavailable(self.fail_with)
        if device.index != self.on_device:
            return {}
        with self.lock:
            self.reads += 1
            used = None if self.step is None else self.step * self.reads
        try:
            children = psutil.Process(self.sup[0].launcher.server_pid).children(recursive=True)
        except psutil.Error:  # a process of the job ended while its tree was read
            return {}
        return {p.pid: used for p in children}

    def utilization(self, device: GpuDevice) -> int | None:
        return 50


def simulated_supervisor(state_dir, **sampler_args) -> tuple[Supervisor, ScriptedSampler]:
    ref: list = []
    sampler = ScriptedSampler(ref, **sampler_args)
    sup = Supervisor(make_policy(state_dir), audit_log=state_dir / "gpu-audit.jsonl", gpu_sampler=sampler)
    ref.append(sup)
    return sup, sampler


def test_simulated_nvml_limit_passed_kills_with_gpu_memory_verdict(state_dir):
    sup, sampler = simulated_supervisor(state_dir)
    with sup:
        r = run(sup, "sleeper.py", wall_time="30s", gpu_memory="300MiB", poll_interval="20ms")
    assert r.verdict is Verdict.gpu_memory, r.reason
    v = next(v for v in r.violations if v.action != "warn")
    assert v.action == "sigkill" and v.limit == 300 * MiB and v.observed >= 300 * MiB
    assert r.signal == "SIGKILL" and r.usage.wall_seconds < 10
    assert r.usage.peak_gpu_memory >= 300 * MiB
    assert any(s.gpu_memory for s in r.timeline)
    assert r.enforcement["gpu_memory"].level == "off"  # arch cpu: Taichi itself allocates no device memory


def test_simulated_nvml_fractional_limit_resolved_against_device(state_dir):
    sup, _ = simulated_supervisor(state_dir)
    with sup:
        r = run(sup, "sleeper.py", wall_time="30s", gpu_memory="25%")
    assert r.verdict is Verdict.gpu_memory
    assert next(v for v in r.violations if v.action != "warn").limit == DEV0.memory_total / 4


def test_simulated_nvml_other_device_is_not_counted(state_dir):
    sup, _ = simulated_supervisor(state_dir, on_device=0)
    with sup:
        r = run(sup, "sleeper.py", wall_time="1s", gpu_memory="100MiB", env={"CUDA_VISIBLE_DEVICES": "1"})
    assert r.verdict is Verdict.wall_time
    assert r.usage.peak_gpu_memory == 0


@pytest.mark.parametrize("error", ["NVML: Not Supported", "NVML: GPU is lost"])
def test_simulated_nvml_errors_degrade_without_crashing(state_dir, error):
    sup, _ = simulated_supervisor(state_dir, fail_with=error)
    with sup:
        r = run(sup, "saxpy.py", gpu_memory="100MiB")
    assert r.verdict is Verdict.ok
    assert f"gpu_memory watch stopped: {error}" in r.notes
    assert r.usage.peak_gpu_memory is None


def test_simulated_nvml_none_memory_is_unknown_not_zero_crash(state_dir):
    sup, _ = simulated_supervisor(state_dir, step=None)
    with sup:
        r = run(sup, "saxpy.py", gpu_memory="100MiB")
    assert r.verdict is Verdict.ok and r.usage.peak_gpu_memory == 0
    assert any("no memory figure" in n for n in r.notes)


def test_simulated_nvml_library_missing_reports_unavailable(state_dir):
    sup, _ = simulated_supervisor(state_dir, open_error="no NVML: NVML Shared Library Not Found")
    with sup:
        devices, nvml_error = sup.gpu_facts()
    assert devices == [] and nvml_error == "no NVML: NVML Shared Library Not Found"


def test_pid_mapping_through_nspid(tmp_path):
    status = tmp_path / "123" / "status"
    status.parent.mkdir()
    status.write_text("Name:\tpython\nNSpid:\t98765\t123\n")
    assert host_pid(123, str(tmp_path)) == 98765
    assert host_pid(456, str(tmp_path)) == 456  # unreadable: the pid itself

    class OneProcess(GpuSampler):
        def used_by(self, device):
            return {98765: 512 * MiB, 1: 4096 * MiB}

    reading = GpuWatch(OneProcess(), [DEV0], proc_root=str(tmp_path)).read([123])
    assert reading.used == 512 * MiB


@pytest.mark.parametrize("value,expected", [
    (None, [0, 1]), ("1", [1]), ("1,0", [1, 0]), ("GPU-bbbb", [1]), ("0,7,1", [0]), ("", []), ("-1", []),
])
def test_device_selection_follows_cuda_visible_devices(value, expected):
    assert [d.index for d in visible_devices([DEV0, DEV1], value)] == expected


def test_simulated_mps_daemon_sets_pinned_memory_limit(state_dir, tmp_path):
    os.mkfifo(tmp_path / "control")
    assert mps_pipe_directory({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)}) == str(tmp_path)
    assert mps_pipe_directory({"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path / "none")}) is None
    assert mps_env(str(tmp_path), 2 << 30, 2)["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=2048M,1=2048M"
    sup, _ = simulated_supervisor(state_dir)
    spec = JobSpec(kernel=kernel("saxpy.py"), env={"CUDA_MPS_PIPE_DIRECTORY": str(tmp_path)})
    with sup:
        jobdir = sup.disks.make(spec.job_id, None)
        try:
            prepared = sup._prepare(spec, Limits(gpu_memory="1GiB"), "cuda", jobdir)
        finally:
            jobdir.remove()
    assert prepared.plan.env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=1024M,1=1024M"
    assert prepared.enforcement["gpu_memory"].level == "hard"
    assert prepared.enforcement["address_space"].level == "off" and "RLIMIT_AS" not in prepared.rlimits


def test_real_nvml_sampler(state_dir):
    sampler = NvmlSampler()
    try:
        sampler.open()
    except GpuUnavailable as err:
        assert str(err)  # the reason is reported, nothing crashed
        pytest.skip(f"NVML does not load here: {err}")
    assert sampler.driver()
    for device in sampler.devices():
        assert device.memory_total > 0
        assert isinstance(sampler.used_by(device), dict)


def test_cuda_without_device_is_rejected_with_reason(supervisor):
    if probe("cuda").usable:
        pytest.skip("this machine has CUDA")
    r = supervisor.run(JobSpec(kernel=kernel("saxpy.py"), arch="cuda"))
    assert r.verdict is Verdict.rejected and r.reason.startswith("arch cuda requested; ")


@vulkan
def test_vulkan_job_ok_with_correct_result(supervisor):
    r = run(supervisor, "reduction.py:sum_of_squares", arch="vulkan", kwargs={"n": 1000})
    assert r.verdict is Verdict.ok, r.reason
    assert r.return_value == 332833500
    assert r.ti_init[-1]["effective"]["arch"] == "vulkan"
    assert r.enforcement["gpu_memory"].level == "unavailable"


@vulkan
def test_gpu_resolves_to_vulkan_here(supervisor):
    if probe("cuda").usable:
        pytest.skip("this machine has CUDA: gpu resolves to cuda")
    r = run(supervisor, "saxpy.py", arch="gpu")
    assert r.verdict is Verdict.ok and r.arch == "vulkan"
    assert "gpu resolved to vulkan" in r.notes
    checksum = float(r.stdout_tail.split("saxpy checksum")[1].split()[0])
    assert checksum == pytest.approx(5.000005e11, rel=1e-3)  # f32 accumulation order differs per backend


@vulkan
def test_vulkan_memory_hog_caught_by_rss_monitor(supervisor):
    r = run(supervisor, "vulkan_memory_hog.py", arch="vulkan", memory="700MiB", wall_time="60s")
    assert r.verdict is Verdict.memory, r.reason
    assert r.usage.peak_rss > 700 * MiB


@vulkan
def test_vulkan_arch_override_attempts_are_contained(supervisor, tmp_path):
    script = tmp_path / "override.py"
    script.write_text("import os\nimport taichi as ti\nos.environ['TI_ARCH'] = 'x64'\n"
                      "ti.init(arch=ti.cpu)\nprint(ti.lang.impl.current_cfg().arch)\n")
    r = supervisor.run(JobSpec(kernel=str(script), arch="vulkan"))
    assert_no_survivors(supervisor, r.job_id)
    assert r.verdict is Verdict.ok, r.reason
    assert "vulkan" in r.stdout_tail
    assert {"arch", "env TI_ARCH"} <= set(r.ti_init[0]["clamped"])
