"""The supervisor: turns a JobSpec into a confined child, watches it, ends it, and writes the verdict.

Data flows one way: spec → (policy, arch, rlimits, env) → launcher → child → channel/pipes → verdict.
Thread-safe: several threads may call `run()` at once (one I/O thread per job; one shared monitor thread).
"""

from __future__ import annotations

import collections
import math
import os
import selectors
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

from .audit import AuditLog
from .channel import ChannelReader, ResultMessage, RlimitMessage, TiInitMessage
from .child import ChildPlan
from .enforcement import Enforcement, GpuFacts, enforcement_for
from .forkserver import MAX_PLAN_BYTES
from .gpu import (ArchUnavailable, GpuDevice, GpuSampler, GpuUnavailable, GpuWatch, NvmlSampler, mps_env,
                  mps_pipe_directory, resolve_arch, visible_devices)
from .launcher import JOB_MARKER, Exit, LauncherLost, base_env, make_launcher
from .limits import DEFAULT_ENV_ALLOW, GiB, ConfigError, Limits, Policy, address_space_for, load_policy
from .models import TAIL_BYTES, JobResult, JobSpec, Sample, Termination, Usage, Verdict, Violation
from .monitor import JobControl, JobTree, Monitor

RLIMIT_CPU_HARD_EXTRA = 2  # seconds between SIGXCPU (soft) and the kernel's SIGKILL (hard)
PUMP_DRAIN_TIMEOUT = 2.0
AS_ERROR_MARKERS = ("memory allocation", "cannot allocate memory", "out of memory")


class _Pump(threading.Thread):
    """Reads stdout, stderr and the channel until EOF; keeps bounded tails and exact byte counts."""

    def __init__(self, stdout_r: int, stderr_r: int, channel_r: int, output_limit: int | None,
                 on_output_limit: Callable[[], None]) -> None:
        super().__init__(name="tsbx-io", daemon=True)
        self._output_limit, self._on_output_limit = output_limit, on_output_limit
        self.fds = {stdout_r: "stdout", stderr_r: "stderr", channel_r: "channel"}
        self.tails = {"stdout": collections.deque(), "stderr": collections.deque()}
        self.tail_sizes = {"stdout": 0, "stderr": 0}
        self.counts = {"stdout": 0, "stderr": 0}
        self.channel = ChannelReader()
        self.stop_event = threading.Event()

    def output_bytes(self) -> int:
        return self.counts["stdout"] + self.counts["stderr"]

    def _keep(self, name: str, data: bytes) -> None:
        tail = self.tails[name]
        tail.append(data)
        self.tail_sizes[name] += len(data)
        while self.tail_sizes[name] - len(tail[0]) >= TAIL_BYTES:
            self.tail_sizes[name] -= len(tail.popleft())

    def tail(self, name: str) -> str:
        return b"".join(self.tails[name])[-TAIL_BYTES:].decode("utf-8", "replace")

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for fd in self.fds:
            sel.register(fd, selectors.EVENT_READ)
        open_fds = set(self.fds)
        while open_fds and not self.stop_event.is_set():
            for key, _ in sel.select(timeout=0.1):
                data = os.read(key.fd, 1 << 16)
                name = self.fds[key.fd]
                if not data:
                    sel.unregister(key.fd)
                    open_fds.discard(key.fd)
                elif name == "channel":
                    self.channel.feed(data)
                else:
                    self.counts[name] += len(data)
                    self._keep(name, data)
                    if self._output_limit is not None and self.output_bytes() > self._output_limit:
                        self._on_output_limit()
                        self._output_limit = None
        sel.close()
        for fd in self.fds:
            os.close(fd)


STALE_LOCK_SECONDS = 30.0


def tenant_key(spec: JobSpec) -> str:
    """The tenant's name for per-tenant state (offline cache); '_default' without a tenant."""
    return spec.tenant or "_default"


RLIMIT_NAMES = {"cpu": "RLIMIT_CPU", "as": "RLIMIT_AS", "nofile": "RLIMIT_NOFILE", "fsize": "RLIMIT_FSIZE",
                "core": "RLIMIT_CORE"}


@dataclass
class _Prepared:
    """The supervisor's decisions for one job, made before it starts."""

    plan: ChildPlan
    rlimits: dict[str, int]
    notes: list[str]
    gpu_watch: GpuWatch | None
    gpu_limit: int | None
    enforcement: dict[str, Enforcement]


class _Job:
    """State of one running job, shared by the monitor thread and the waiting thread."""

    def __init__(self, spec: JobSpec, limits: Limits) -> None:
        self.spec, self.limits = spec, limits
        self.violations: list[Violation] = []
        self.termination: Termination | None = None
        self.notes: list[str] = []
        self.tree: JobTree | None = None
        self.lock = threading.Lock()


def _signal_all(procs: list[psutil.Process], pgid: int, sig: int) -> list[int]:
    try:
        os.killpg(pgid, sig)
    except OSError:
        pass
    hit = []
    for proc in procs:
        try:
            proc.send_signal(sig)
            hit.append(proc.pid)
        except psutil.Error:
            pass
    return hit


class Supervisor:
    """Runs jobs under a policy. Use as a context manager, or call `close()` (stops the fork-server)."""

    def __init__(self, policy: Policy | None = None, launcher: str | None = None,
                 audit_log: str | os.PathLike | None = None, gpu_sampler: GpuSampler | None = None) -> None:
        self.policy = policy if policy is not None else load_policy()
        self.launcher = make_launcher(launcher or self.policy.settings.launcher)
        self.audit = AuditLog(audit_log or self.policy.settings.resolved_audit_log())
        self.gpu_sampler = gpu_sampler if gpu_sampler is not None else NvmlSampler()
        self._gpu: tuple[list[GpuDevice], str | None] | None = None
        self._gpu_lock = threading.Lock()
        self._launch_lock = threading.Lock()
        self._running: dict[int, str] = {}  # main pid of each running job -> its tenant key

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.launcher.close()

    # --- preparing -------------------------------------------------------------------------------

    def gpu_facts(self) -> tuple[list[GpuDevice], str | None]:
        """(devices, why NVML is unavailable or None), read once per supervisor (opened lazily)."""
        with self._gpu_lock:
            if self._gpu is None:
                try:
                    self.gpu_sampler.open()
                    self._gpu = (self.gpu_sampler.devices(), None)
                except GpuUnavailable as err:
                    self._gpu = ([], str(err))
            return self._gpu

    def _prepare(self, spec: JobSpec, limits: Limits, arch: str, workdir: Path) -> _Prepared:
        """Everything the child needs, decided here once: rlimits, env, dirs, Taichi caps, GPU watch."""
        target, function = spec.target()
        if function is None or target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"kernel file not found: {target}")
            target = str(path.resolve())
        rlimits: dict[str, tuple[int, int]] = {"core": (0, 0)}
        if limits.cpu_time is not None:
            soft = max(1, math.ceil(limits.cpu_time))
            rlimits["cpu"] = (soft, soft + max(RLIMIT_CPU_HARD_EXTRA, math.ceil(limits.grace)))
        address_space, as_note = address_space_for(limits, arch)
        if address_space is not None:
            rlimits["as"] = (address_space, address_space)
        if limits.max_open_files is not None:
            rlimits["nofile"] = (limits.max_open_files, limits.max_open_files)
        if limits.max_file_size is not None:
            rlimits["fsize"] = (limits.max_file_size, limits.max_file_size)
        env = {name: os.environ[name] for name in (*DEFAULT_ENV_ALLOW, *self.policy.settings.env_allow)
               if name in os.environ}
        home, tmp, work = workdir / "home", workdir / "tmp", workdir / "work"
        for d in (home, tmp, work):
            d.mkdir()
        env.update(base_env())
        env.update({"HOME": str(home), "TMPDIR": str(tmp), "OPENBLAS_NUM_THREADS": "1",
                    "MALLOC_ARENA_MAX": "2", JOB_MARKER: spec.job_id})
        env.update(spec.env)
        cache = self.policy.settings.resolved_state_dir() / "ticache" / tenant_key(spec)
        cache.mkdir(parents=True, exist_ok=True)
        notes = [f"address_space {as_note}"]
        if self._remove_stale_cache_lock(cache, tenant_key(spec)):
            notes.append(f"removed a stale ticache.lock left by a killed job in {cache}")
        caps: dict = {"offline_cache_file_path": str(cache),
                      "cpu_max_num_threads": limits.cpu_threads or os.cpu_count() or 1}
        if isinstance(limits.gpu_memory, float):
            caps["device_memory_fraction"] = limits.gpu_memory
        elif isinstance(limits.gpu_memory, int):
            caps.update(device_memory_GB=limits.gpu_memory / GiB, device_memory_fraction=0.0)

        devices, nvml_error = self.gpu_facts()
        visible = visible_devices(devices, env.get("CUDA_VISIBLE_DEVICES"))
        gpu_limit = limits.gpu_memory
        if isinstance(gpu_limit, float):
            gpu_limit = int(gpu_limit * visible[0].memory_total) if visible else None
        mps_dir = mps_pipe_directory(env) if arch == "cuda" and gpu_limit is not None else None
        if mps_dir is not None:
            env.update(mps_env(mps_dir, gpu_limit, len(visible)))
            notes.append(f"gpu_memory hard-capped by NVIDIA MPS ({mps_dir})")
        facts = GpuFacts(nvml_error=nvml_error, mps=mps_dir is not None)
        watch = GpuWatch(self.gpu_sampler, visible) if facts.nvml_error is None and visible else None
        plan = ChildPlan(job_id=spec.job_id, target=target, function=function, args=spec.args,
                         kwargs=spec.kwargs, argv=spec.argv, ti_arch=arch, ti_caps=caps, rlimits=rlimits,
                         env=env, workdir=str(work), parent_pid=0, preinit=function is not None)
        if len(plan.model_dump_json()) > MAX_PLAN_BYTES:
            raise ConfigError(f"job too large: its args, kwargs, argv and env exceed {MAX_PLAN_BYTES} bytes")
        return _Prepared(plan=plan, rlimits={RLIMIT_NAMES[k]: v[0] for k, v in rlimits.items()}, notes=notes,
                         gpu_watch=watch, gpu_limit=gpu_limit,
                         enforcement=enforcement_for(limits, arch, address_space, facts))

    def _remove_stale_cache_lock(self, cache: Path, tenant: str) -> bool:
        """Taichi skips caching while `ticache.lock` exists; a killed job leaves one behind. It is
        stale when no job of the tenant runs here and it is older than STALE_LOCK_SECONDS."""
        lock = cache / "ticache.lock"
        with self._launch_lock:
            if tenant in self._running.values():
                return False
            try:
                if time.time() - lock.stat().st_mtime < STALE_LOCK_SECONDS:
                    return False
                lock.unlink()
            except FileNotFoundError:
                return False
        return True

    def _rejected(self, spec: JobSpec, reason: str, started: float) -> JobResult:
        result = JobResult(job_id=spec.job_id, kernel=spec.kernel, arch=spec.arch, verdict=Verdict.rejected,
                           reason=reason, labels=spec.labels, started_at=started, ended_at=time.time(),
                           launcher=self.launcher.name)
        self.audit.record(result, spec.tenant)
        return result

    # --- running ---------------------------------------------------------------------------------

    def run(self, spec: JobSpec, on_sample: Callable[[Sample], None] | None = None,
            control: JobControl | None = None) -> JobResult:
        """Run one job to its verdict. Never raises for anything the job does; returns `rejected`
        for a spec that cannot run (unknown profile, missing kernel file, unusable arch).
        `control.cancel()` ends the job with verdict `cancelled`."""
        started_epoch = time.time()
        workdir = None
        try:
            limits = self.policy.resolve(spec.profile, spec.tenant, spec.limits, spec.job_type)
            arch, arch_note = resolve_arch(spec.arch, self.policy.settings.gpu_fallback_cpu)
            workdir = Path(tempfile.mkdtemp(prefix=f"tsbx-{spec.job_id}-"))
            prepared = self._prepare(spec, limits, arch, workdir)
        except BaseException as err:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            if isinstance(err, (ConfigError, ArchUnavailable)):
                return self._rejected(spec, str(err), started_epoch)
            raise
        try:
            result = self._supervise(spec, limits, prepared, on_sample, control, started_epoch)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        result.rlimits = prepared.rlimits
        result.enforcement = prepared.enforcement
        result.notes = [arch_note, *prepared.notes, *result.notes]
        self.audit.record(result, spec.tenant)
        return result

    def _supervise(self, spec: JobSpec, limits: Limits, prepared: _Prepared, on_sample: Callable[[Sample], None] | None,
                   control: JobControl | None, started_epoch: float) -> JobResult:
        job, plan = _Job(spec, limits), prepared.plan
        (out_r, out_w), (err_r, err_w), (ch_r, ch_w) = os.pipe(), os.pipe(), os.pipe()
        try:
            with self._launch_lock:
                launched = self.launcher.start(plan, out_w, err_w, ch_w)
                started = time.monotonic()  # the job's clock: a fork-server's own start is not its time
                self._running[launched.pid] = tenant_key(spec)
        except BaseException:
            for fd in (out_r, err_r, ch_r):
                os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, ch_w):
                os.close(fd)
        job.tree = JobTree(launched.pid)
        monitor = Monitor(job.tree, limits, started, time.time, lambda: pump.output_bytes(),
                          lambda v: self._terminate(job, launched.pid, v), on_sample,
                          gpu=prepared.gpu_watch, gpu_limit=prepared.gpu_limit, control=control)
        pump = _Pump(out_r, err_r, ch_r, limits.max_output, monitor.wake)
        try:
            pump.start()
            monitor.start()
            exit_ = launched.wait()
        except LauncherLost as err:  # the fork-server died under the job: no exit status to read
            exit_ = Exit(code=None, signal=None, cpu_seconds=0.0, max_rss=0)
            job.notes.append(str(err))
        finally:
            ended = time.monotonic()
            monitor.stop()
            self._reap_leftovers(job, launched.pid)
        pump.join(PUMP_DRAIN_TIMEOUT)
        if pump.is_alive():
            pump.stop_event.set()
            pump.join()
            job.notes.append("output pipes still held open by an unknown process; stopped reading")
        if prepared.gpu_watch is not None and prepared.gpu_watch.failure is not None:
            job.notes.append(f"gpu_memory watch stopped: {prepared.gpu_watch.failure}")
        if monitor.gpu_unreported:
            job.notes.append(f"NVML reported no memory figure for {monitor.gpu_unreported} GPU process(es) of "
                             "the job: gpu_memory usage is a lower bound")
        return self._verdict(job, plan, monitor, pump, exit_, started_epoch, ended - started)

    def _terminate(self, job: _Job, pgid: int, violation: Violation | None) -> None:
        """SIGTERM the whole tree, wait `grace`, SIGKILL what is left (or SIGKILL at once).
        `violation` None means the job was cancelled."""
        with job.lock:
            if violation is not None:
                job.violations.append(violation)
            job.termination = Termination(reason=violation.resource if violation is not None else "cancelled")
        term = job.termination
        if violation is not None and violation.action == "sigkill":
            term.killed_pids = _signal_all(job.tree.alive(), pgid, signal.SIGKILL)
            term.sigkill_at = time.time()
            return
        term.terminated_pids = _signal_all(job.tree.alive(), pgid, signal.SIGTERM)
        term.sigterm_at = time.time()
        deadline = time.monotonic() + job.limits.grace
        while time.monotonic() < deadline and job.tree.alive():
            time.sleep(min(0.01, max(deadline - time.monotonic(), 0)))
        remaining = job.tree.alive()
        if remaining:
            term.killed_pids = _signal_all(remaining, pgid, signal.SIGKILL)
            term.sigkill_at = time.time()

    def _reap_leftovers(self, job: _Job, pgid: int) -> None:
        """After the main process ended: SIGKILL whatever of the job still lives, including orphans
        re-parented to the launcher's subreaper before the monitor ever saw them."""
        with self._launch_lock:
            self._running.pop(pgid, None)
            leftovers = job.tree.alive()
            known = {p.pid for p in leftovers}
            leftovers += [p for p in self.launcher.orphans(job.spec.job_id, set(self._running))
                          if p.pid not in known]
        if leftovers:
            killed = _signal_all(leftovers, pgid, signal.SIGKILL)
            job.notes.append(f"killed {len(killed)} leftover process(es) after the main process ended: "
                             f"{sorted(killed)}")
            psutil.wait_procs(leftovers, timeout=1.0)
        # With nothing left, the group id may already belong to a new job: no killpg then.

    # --- deciding --------------------------------------------------------------------------------

    def _verdict(self, job: _Job, plan: ChildPlan, monitor: Monitor, pump: _Pump, exit_: Exit,
                 started_epoch: float, wall: float) -> JobResult:
        messages, protocol_errors = pump.channel.messages()
        results = [m for m in messages if isinstance(m, ResultMessage)]
        final = results[-1] if results else None
        violations = list(job.violations)
        limits = job.limits
        peak = monitor.peak
        cpu = max(peak.cpu, exit_.cpu_seconds)

        def rlimit_hit(resource: str, limit: float, observed: float) -> None:
            violations.append(Violation(at=time.time(), pid=job.tree.root_pid, resource=resource, limit=limit,
                                        observed=observed, action="none", detected_by="rlimit"))

        sigxcpu_reported = any(isinstance(m, RlimitMessage) and m.resource == "cpu_time" for m in messages)
        killed_at_hard_limit = (exit_.signal in (signal.SIGXCPU, signal.SIGKILL) and limits.cpu_time is not None
                                and exit_.cpu_seconds >= math.ceil(limits.cpu_time))
        if limits.cpu_time is not None and (sigxcpu_reported or (killed_at_hard_limit and not violations)):
            rlimit_hit("cpu_time", limits.cpu_time, cpu)
        if (final is not None and final.status == "error" and not violations and "as" in plan.rlimits
                and (final.error_type == "MemoryError"
                     or any(k in (final.error_message or "").lower() for k in AS_ERROR_MARKERS))):
            rlimit_hit("address_space", plan.rlimits["as"][0], peak.vms)
        breaking = [v for v in violations if v.action != "warn"]
        signame = _signal_name(exit_.signal) if exit_.signal else None
        if breaking:
            first = breaking[0]
            verdict = Verdict(first.resource)
            reason = f"{first.resource} limit {_fmt(first.resource, first.limit)} exceeded: " \
                     f"observed {_fmt(first.resource, first.observed)} ({first.detected_by})"
        elif job.termination is not None and job.termination.reason == "cancelled":
            verdict, reason = Verdict.cancelled, "cancelled by request"
        elif final is not None and final.status == "ok" and exit_.code == 0:
            verdict, reason = Verdict.ok, ""
        elif final is not None and final.status == "error":
            verdict = Verdict.error
            reason = f"{final.error_type}: {final.error_message}".splitlines()[0][:300]
        elif signame is not None:
            verdict, reason = Verdict.crashed, f"killed by {signame} {_after(final)}"
        elif exit_.code is None:
            verdict, reason = Verdict.crashed, "the fork-server died before the job ended; exit status unknown"
        elif exit_.code == 0:
            verdict, reason = Verdict.ok, ""
            job.notes.append("no result message: the job left through os._exit(0)")
        else:
            verdict, reason = Verdict.error, f"exited with status {exit_.code} {_after(final)}"
        if protocol_errors:
            job.notes.extend(protocol_errors)
            if final is None and verdict in (Verdict.ok, Verdict.error):
                verdict, reason = Verdict.crashed, f"malformed result channel: {protocol_errors[0]}"
        usage = Usage(cpu_seconds=round(cpu, 4), wall_seconds=round(wall, 4),
                      peak_rss=max(peak.rss, exit_.max_rss), peak_vms=peak.vms,
                      peak_processes=peak.processes, peak_gpu_memory=monitor.peak_gpu,
                      output_bytes=pump.output_bytes())
        return JobResult(
            job_id=job.spec.job_id, kernel=job.spec.kernel, arch=plan.ti_arch, verdict=verdict, reason=reason,
            exit_code=exit_.code, signal=signame,
            violations=sorted(violations + monitor.warnings, key=lambda v: v.at),
            usage=usage, limits=limits, notes=job.notes,
            return_value=final.return_value if final is not None and verdict is Verdict.ok else None,
            error_type=final.error_type if final else None, error_message=final.error_message if final else None,
            traceback=final.traceback if final else None,
            stdout_tail=pump.tail("stdout"), stderr_tail=pump.tail("stderr"),
            stdout_bytes=pump.counts["stdout"], stderr_bytes=pump.counts["stderr"],
            ti_init=[m.model_dump(exclude={"type"}) for m in messages if isinstance(m, TiInitMessage)],
            timeline=monitor.timeline.samples, termination=job.termination, launcher=self.launcher.name,
            labels=job.spec.labels, started_at=started_epoch, ended_at=time.time())


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals have no name in the enum
        return f"SIG{number}"


def _after(final: ResultMessage | None) -> str:
    return "after reporting success" if final is not None else "without a result"


def _fmt(resource: str, value: float) -> str:
    if resource in ("memory", "address_space", "gpu_memory", "output"):
        return f"{value / (1 << 20):.1f} MiB"
    if resource in ("cpu_time", "wall_time"):
        return f"{value:.2f}s"
    return f"{value:g}"
