"""The supervisor: turns a JobSpec into a confined child, watches it, ends it, and writes the verdict.

Data flows one way: spec → (policy, arch, rlimits, env) → launcher → child → channel/pipes → verdict.
Thread-safe: several threads may call `run()` at once (one I/O thread per job; one shared monitor thread).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..core.audit import AuditLog
from ..core.limits import DEFAULT_ENV_ALLOW, GiB, ConfigError, Limits, Policy, address_space_for, load_policy
from ..core.models import JobResult, JobSpec, Sample, Termination, Verdict, Violation
from ..job import namespaces
from ..job.backstop import BACKSTOP_SLACK
from ..job.binds import Binds
from ..job.cgroup import CgroupHost, JobCgroup, discover
from ..job.child import ChildPlan
from ..job.disk import JobDir, JobDisks
from ..job.files import collect_job, missing_input_hint
from ..job.inputs import Sent, stage
from ..job.forkserver import MAX_PLAN_BYTES
from ..job.interpreter import base_env
from ..job.launcher import JOB_MARKER, Exit, LaunchFailed, LauncherLost, make_launcher
from ..job.ticache import TenantCache
from ..watch.enforcement import DiskFacts, Enforcement, GpuFacts, enforcement_for, headline
from ..watch.gpu import (ArchUnavailable, GpuDevice, GpuSampler, GpuUnavailable, GpuWatch, NvmlSampler, mps_env,
                  mps_pipe_directory, resolve_arch, visible_devices)
from ..watch.monitor import JobControl, Monitor
from ..watch.pump import Pump
from ..watch.terminate import JobProcesses, end_job
from ..watch.tree import JobTree
from ..watch.verdict import Evidence, decide
from .confinement import filter_syscalls, isolate, job_cgroup

RLIMIT_CPU_HARD_EXTRA = 2  # seconds between SIGXCPU (soft) and the kernel's SIGKILL (hard)
PUMP_DRAIN_TIMEOUT = 2.0


def _room(limits: Limits) -> float:
    """Seconds past a job's wall_time or lease end before its fork-server kills it (sandbox.job.backstop):
    room for the supervisor's own SIGTERM, grace and SIGKILL."""
    return limits.grace + BACKSTOP_SLACK


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
    cgroup: JobCgroup | None
    cache: TenantCache
    jobdir: JobDir
    placed: set[str]  # where its input files are, relative to its cwd


class _Job:
    """State of one running job, shared by the monitor thread and the waiting thread."""

    def __init__(self, spec: JobSpec, limits: Limits, procs: JobProcesses) -> None:
        self.spec, self.limits, self.procs = spec, limits, procs
        self.violations: list[Violation] = []
        self.termination: Termination | None = None
        self.notes: list[str] = []
        self.lock = threading.Lock()


class Supervisor:
    """Runs jobs under a policy. Use as a context manager, or call `close()` (stops the fork-server)."""

    def __init__(self, policy: Policy | None = None, launcher: str | None = None,
                 audit_log: str | os.PathLike | None = None, gpu_sampler: GpuSampler | None = None,
                 cgroups: CgroupHost | None = None) -> None:
        """`cgroups`: the cgroup mechanism to use; discovered per the policy's `[sandbox] cgroups`
        when None."""
        self.policy = policy if policy is not None else load_policy()
        self.cgroups = cgroups if cgroups is not None else discover(self.policy.settings.cgroups)
        self.disks = JobDisks(self.policy.settings)  # unmounts what a supervisor that died left mounted
        self.audit = AuditLog(audit_log or self.policy.settings.resolved_audit_log())
        self.launcher = make_launcher(launcher or self.policy.settings.launcher, str(self.audit.path))
        self.gpu_sampler = gpu_sampler if gpu_sampler is not None else NvmlSampler()
        self._gpu: tuple[list[GpuDevice], str | None] | None = None
        self._gpu_lock = threading.Lock()
        self._launch_lock = threading.Lock()
        self._running: set[int] = set()  # main pid of each running job

    def __enter__(self) -> "Supervisor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.launcher.close()

    # --- preparing -------------------------------------------------------------------------------

    def namespaces_unavailable(self) -> str | None:
        """Why jobs cannot get their own namespaces here, or None when they can."""
        if self.policy.settings.isolation == "off":
            return 'off by policy ([sandbox] isolation = "off")'
        return self._namespace_probe

    @functools.cached_property
    def _namespace_probe(self) -> str | None:
        """namespaces.probe(), once per supervisor (it starts an interpreter)."""
        return namespaces.probe()

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

    def _prepare(self, spec: JobSpec, limits: Limits, arch: str, jobdir: JobDir,
                 sent: Sent | None = None, binds: Binds | None = None) -> _Prepared:
        """Everything the child needs, decided here once: rlimits, env, dirs, Taichi caps, GPU watch.
        `jobdir`: the job's directory (on its own filesystem image where `disk` is held by one).
        `sent`: what a client sent with the job (read with its own permissions): the kernel file's
        contents, written into the job's work dir under the file's name, and its inputs' descriptors,
        so the supervisor never opens the client's paths. `binds`: spec.binds, opened (run() releases them)."""
        target, function = spec.target()
        workdir = jobdir.path
        home, tmp, work, cache = workdir / "home", workdir / "tmp", workdir / "work", workdir / "cache"
        for d in (home, tmp, work, cache):
            d.mkdir()
        if sent is not None and sent.source is not None:
            path = work / Path(target).name
            path.write_bytes(sent.source)
            target = str(path)
        elif spec.shipped is None and (function is None or target.endswith(".py")):
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
        env.update(base_env())
        env.update({"HOME": str(home), "TMPDIR": str(tmp), JOB_MARKER: spec.job_id})
        env.update(spec.env)
        notes = [f"address_space {as_note}"]
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
        plan = ChildPlan(job_id=spec.job_id, target=target, function=function, shipped=spec.shipped, args=spec.args,
                         kwargs=spec.kwargs, argv=spec.argv, ti_arch=arch, ti_caps=caps, rlimits=rlimits, env=env,
                         workdir=str(work), parent_pid=0, preinit=function is not None, max_result=limits.max_result,
                         backstop=None if limits.wall_time is None else limits.wall_time + _room(limits))
        if len(plan.model_dump_json()) > MAX_PLAN_BYTES:
            raise ConfigError(f"job too large: its args, kwargs, argv and env exceed {MAX_PLAN_BYTES} bytes")
        kept = TenantCache(self.policy.settings.resolved_state_dir() / "ticache" / tenant_key(spec),
                           self.policy.cache_quota(spec.tenant), None)
        isolation = dataclasses.replace(isolate(self.policy, self.namespaces_unavailable(), plan, tenant_key(spec),
                                                limits, workdir, kept, notes),
                                        **filter_syscalls(self.policy.settings, plan))
        job_ids = (plan.uid, plan.gid) if plan.uid is not None else None  # None: jobs run as this process
        plan.expose += binds.expose() if binds is not None else []
        notes.extend(kept.seed(cache, job_ids))
        placed, staged = stage(spec.inputs, spec.output_dir, plan.workdir, job_ids,
                               sent.inputs if sent is not None else None, limits.disk)
        notes.extend(staged)
        if job_ids is not None and binds is not None:
            binds.lend(*job_ids)  # run() hands them back whatever happens from here
        # The cgroup comes last: nothing after it may raise, or it would be left behind.
        cgroup, cgroup_known = job_cgroup(self.cgroups, self.policy.settings, spec.job_id, limits,
                                          caps["cpu_max_num_threads"],
                                          helpers=self.launcher.helpers(plan.isolate))
        if cgroup is not None:
            plan.cgroup_join = cgroup.join_files()
            notes.append(f"{cgroup.label}: {cgroup.path}")
        elif cgroup_known.reason:
            notes.append(f"no job cgroup, limits polled: {cgroup_known.reason}")
        return _Prepared(plan=plan, rlimits={RLIMIT_NAMES[k]: v[0] for k, v in rlimits.items()}, notes=notes,
                         gpu_watch=watch, gpu_limit=gpu_limit, cgroup=cgroup, cache=kept, jobdir=jobdir, placed=placed,
                         enforcement=enforcement_for(limits, arch, address_space, facts, cgroup_known, isolation,
                                                     DiskFacts(jobdir.image_size, jobdir.reason)))

    def _record(self, result: JobResult, spec: JobSpec, queued: dict | None) -> None:
        """Audit the verdict; a log that cannot be written (a full disk) changes nothing about it."""
        try:
            self.audit.record(result, spec.tenant, spec.job_type, **(queued or {}))
        except OSError as err:
            result.notes.append(f"audit log: the job's record waits in memory until the log can be written ({err})")

    def _not_run(self, spec: JobSpec, reason: str, started: float, verdict: Verdict = Verdict.rejected,
                 queued: dict | None = None) -> JobResult:
        """The result of a job that never started: `rejected`, or `crashed` when the launcher failed."""
        result = JobResult.not_run(spec, verdict, reason, started, self.launcher.name)
        self._record(result, spec, queued)
        return result

    # --- running ---------------------------------------------------------------------------------

    def run(self, spec: JobSpec, on_sample: Callable[[Sample], None] | None = None,
            control: JobControl | None = None, *, sent: Sent | None = None,
            on_output: Callable[[str, bytes], None] | None = None,
            hold_result: Callable[[int], tuple[int, str] | None] | None = None,
            queued: dict | None = None) -> JobResult:
        """Run one job to its verdict. Never raises for anything the job does; returns `rejected`
        for a spec that cannot run (unknown profile, missing kernel file, unusable arch).
        `control.cancel()` ends the job with verdict `cancelled`, `control.preempt()` with `preempted`. `sent`: see `_prepare`;
        `on_output(stream, data)`: the job's stdout/stderr as it comes (from its I/O thread);
        `hold_result(size)`: asked before a return value of `size` bytes is read, None or (the bound,
        why) it cannot be held: then the verdict is `result`, for that reason. `queued`: what the queue
        that ran the job adds to its audit record (`submitted_at`, `reserved`: see AuditLog.record)."""
        started_epoch = time.time()
        jobdir = binds = None
        try:
            limits = self.policy.resolve(spec.profile, spec.tenant, spec.limits, spec.job_type)
            arch, arch_note = resolve_arch(spec.arch, self.policy.settings.gpu_fallback_cpu)
            binds = Binds(spec.binds)
            jobdir = self.disks.make(spec.job_id, limits.disk)
            prepared = self._prepare(spec, limits, arch, jobdir, sent, binds)
        except BaseException as err:
            if jobdir is not None:
                jobdir.remove()
            if binds is not None:
                binds.release()
            if isinstance(err, (ConfigError, ArchUnavailable)):
                return self._not_run(spec, str(err), started_epoch, queued=queued)
            raise
        try:
            result = self._supervise(spec, limits, prepared, on_sample, control, started_epoch, on_output, hold_result)
            collect_job(spec, prepared.plan, result, prepared.placed, limits.disk)
            missing_input_hint(result, spec.inputs)
            result.notes.extend(prepared.cache.promote(prepared.jobdir.path / "cache"))
        except LaunchFailed as err:
            return self._not_run(spec, str(err), started_epoch, Verdict.crashed, queued)
        finally:
            cgroup_left = prepared.cgroup.remove() if prepared.cgroup is not None else None
            disk_left = jobdir.remove()  # never raises: the verdict is recorded whatever the job left
            disk_left += binds.release()
        if cgroup_left:
            result.notes.append(cgroup_left)
        result.notes.extend(disk_left)
        result.rlimits = prepared.rlimits
        result.enforcement = prepared.enforcement
        result.enforced = headline(prepared.enforcement)
        result.notes = [arch_note, *prepared.notes, *result.notes]
        self._record(result, spec, queued)
        return result

    def _supervise(self, spec: JobSpec, limits: Limits, prepared: _Prepared, on_sample: Callable[[Sample], None] | None,
                   control: JobControl | None, started_epoch: float,
                   on_output: Callable[[str, bytes], None] | None = None,
                   hold_result: Callable[[int], tuple[int, str] | None] | None = None) -> JobResult:
        plan, cgroup = prepared.plan, prepared.cgroup
        (out_r, out_w), (err_r, err_w), (ch_r, ch_w) = os.pipe(), os.pipe(), os.pipe()
        try:
            with self._launch_lock:
                lease = control.lease if control is not None else None
                plan.lease = None if lease is None else lease + _room(limits)
                launched = self.launcher.start(plan, out_w, err_w, ch_w)
                started = time.monotonic()  # the job's clock: a fork-server's own start is not its time
                self._running.add(launched.pid)
        except BaseException:
            for fd in (out_r, err_r, ch_r):
                os.close(fd)
            raise
        finally:
            for fd in (out_w, err_w, ch_w):
                os.close(fd)
        members = (lambda: cgroup.pids(everywhere=False)) if cgroup is not None else None
        tree = JobTree(launched.pid, members=members, helpers=launched.helpers,
                       exact=cgroup is not None and plan.uid is not None)
        job = _Job(spec, limits, JobProcesses(tree, launched.pid, cgroup))
        try:
            self.audit.started(spec, launched.pid, self.launcher.name)
        except OSError as err:  # the job runs: supervise it whatever the log does
            job.notes.append(f"audit log: no started record ({err})")
        requested = control.termination if control is not None else None
        monitor = Monitor(tree, limits, started, time.time, lambda: pump.output_bytes(),
                          lambda v: end_job(job, v, requested), on_sample, gpu=prepared.gpu_watch,
                          gpu_limit=prepared.gpu_limit, control=control, cgroup=cgroup, disk=prepared.jobdir)
        pump = Pump(out_r, err_r, ch_r, limits.max_output, monitor.wake, on_output)
        try:
            if control is not None:  # the fork-server's kill leaves room for our own graceful end
                control.forward(lambda end: launched.lease(None if end is None else end + _room(limits)))
            pump.start()
            monitor.start()
            exit_ = launched.wait()
        except LauncherLost as err:  # the fork-server died under the job: no exit status to read
            exit_ = Exit(code=None, signal=None, cpu_seconds=0.0, max_rss=0)
            job.notes.append(str(err))
        finally:
            ended = time.monotonic()
            if control is not None:
                control.forward(None)
            monitor.stop()
            self._reap_leftovers(job, launched.pid)
        if exit_.enforced is not None and exit_.enforced[0] == "lease":
            self._lease_enforced(job, control, started + exit_.enforced[1])
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
        return decide(Evidence(
            spec=spec, limits=limits, plan=plan, exit=exit_, violations=list(job.violations),
            warnings=monitor.warnings, termination=job.termination, notes=job.notes, peak=monitor.peak,
            peak_gpu=monitor.peak_gpu, timeline=monitor.timeline.samples, pump=pump, wall=ended - started,
            started_epoch=started_epoch, launcher=self.launcher.name, root_pid=launched.pid,
            cgroup_limits=cgroup.limits if cgroup is not None else None,
            cgroup_final=cgroup.stats() if cgroup is not None else None, hold_result=hold_result,
            disk_final=prepared.jobdir.usage(final=True)))

    @staticmethod
    def _lease_enforced(job: _Job, control: JobControl | None, at: float) -> None:
        """The fork-server killed the job at `at` (time.monotonic()) for its lease, grace and
        BACKSTOP_SLACK after its end: that is the verdict's reason, unless the job was ended for
        something else first."""
        ended = f"the node's fork-server ended the job (lease + grace + {BACKSTOP_SLACK:g}s), as its supervisor " \
                "did not act in time"
        detail = control.lapse_reason(at, ended) if control is not None else f"its cluster lease lapsed: {ended}"
        with job.lock:
            if job.termination is None:
                job.termination = Termination(reason="lease", detail=detail)
            elif job.termination.reason == "lease":
                job.termination.detail = detail  # the supervisor's own end came too late
            else:
                job.notes.append("the fork-server killed the job after its cluster lease lapsed")

    def _reap_leftovers(self, job: _Job, pgid: int) -> None:
        """After the main process ended: kill whatever of the job still lives. With a cgroup that is
        one atomic kill; without, the polled tree and the orphans the launcher reaped (found before
        the monitor ever saw them) are stopped, then killed. Processes that left the job's cgroup
        (only a root job can) are looked for among the launcher's orphans either way."""
        with self._launch_lock:
            self._running.discard(pgid)
            killed = job.procs.kill(also=lambda: self.launcher.orphans(job.spec.job_id, set(self._running)))
        if killed:
            job.notes.append(f"killed {len(killed)} leftover process(es) after the main process ended: {killed}")
        if job.procs.outside_cgroup:
            job.notes.append(f"{len(job.procs.outside_cgroup)} process(es) of the job were outside its cgroup "
                             f"when killed: {sorted(job.procs.outside_cgroup)}")
        # With nothing left, the group id may already belong to a new job: no killpg then.
