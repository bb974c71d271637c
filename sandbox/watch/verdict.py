"""Deciding a job's verdict from the evidence: violations, the exit status, the channel, the job's
result files, the kernel's final counters. Reads what the supervisor collected and the result files
(as hostile input, sandbox.job.results), builds the JobResult, acts on nothing.

The first non-warning violation decides (the fork-server's wall_time backstop before any); then
cancellation, preemption or a lapsed cluster lease (`crashed`); then the job's own report (`ok` also
needs exit status 0); then how the process ended.
"""

from __future__ import annotations

import math
import re
import signal
import time
from dataclasses import dataclass
from typing import Callable

from ..core.channel import LeftoversMessage, ResultMessage, RlimitMessage, TiInitMessage
from ..core.limits import Limits
from ..core.units import duration, parse_size
from ..core.models import JobResult, JobSpec, Sample, Termination, Usage, Verdict, Violation
from ..job.backstop import BACKSTOP_SLACK
from ..job.cgroup import CgroupLimits, CgroupStats
from ..job.child import ChildPlan
from ..job.launcher import Exit
from ..job.results import load as load_result
from .monitor import kernel_breaches, own_limit_oom
from .pump import Pump
from .tree import Reading

AS_ERROR_MARKERS = ("memory allocation", "cannot allocate memory", "out of memory")
# how numpy (and others) name a refused allocation: "Unable to allocate 2.44 GiB for an array ..."
ALLOCATION_SIZE = re.compile(r"allocate (\d+(?:\.\d*)?) ?([KMGT]i?B|B|bytes)\b")


@dataclass
class Evidence:
    """Everything the supervisor collected about one finished job."""

    spec: JobSpec
    limits: Limits
    plan: ChildPlan
    exit: Exit
    violations: list[Violation]  # from the monitor's breaches, in order
    warnings: list[Violation]
    termination: Termination | None
    notes: list[str]
    peak: Reading  # the monitor's peaks
    peak_gpu: int | None
    timeline: list[Sample]
    pump: Pump
    wall: float
    started_epoch: float
    launcher: str
    root_pid: int
    cgroup_limits: CgroupLimits | None = None
    cgroup_final: CgroupStats | None = None  # read after the last process of the job ended
    # Asked before a return value of this many bytes is read: None, or (the bound, why) it cannot be held.
    hold_result: Callable[[int], tuple[int, str] | None] | None = None
    disk_final: int | None = None  # what its work dir held then (sandbox.job.disk; None: no disk limit)


def _kernel_violations(ev: Evidence) -> list[Violation]:
    """What the kernel enforced that the monitor did not see before the job ended."""
    if ev.cgroup_final is None or ev.cgroup_limits is None:
        return []
    seen = {(v.resource, v.detected_by) for v in ev.violations}
    return [Violation(at=time.time(), pid=None, resource=resource, limit=limit, observed=observed,
                      action="sigkill" if resource == "memory" else "none", detected_by="cgroup")
            for resource, limit, observed in kernel_breaches(ev.cgroup_final, ev.cgroup_limits)
            if (resource, "cgroup") not in seen]


def _disk_violation(ev: Evidence, seen: list[Violation]) -> list[Violation]:
    """A job that filled its disk and ended before the monitor saw it (its writes failed with
    ENOSPC, then it stopped): the work dir holds its limit at the end."""
    limit = ev.limits.disk
    if ev.disk_final is None or limit is None or ev.disk_final < limit or any(v.resource == "disk" for v in seen):
        return []
    return [Violation(at=time.time(), pid=None, resource="disk", limit=limit, observed=ev.disk_final,
                      action="none", detected_by="supervisor")]


def _backstop_violation(ev: Evidence, explained: dict[int, str]) -> list[Violation]:
    """The job's fork-server killed it at its wall_time backstop (sandbox.job.backstop): that came
    first, whatever the supervisor did late."""
    if ev.exit.enforced is None or ev.exit.enforced[0] != "wall_time" or ev.limits.wall_time is None:
        return []
    after = ev.exit.enforced[1]
    v = Violation(at=ev.started_epoch + after, pid=ev.root_pid, resource="wall_time", limit=ev.limits.wall_time,
                  observed=after, action="sigkill", detected_by="fork-server")
    explained[id(v)] = (f"wall_time limit {_fmt('wall_time', v.limit)} exceeded: its fork-server enforced it, killing "
                        f"the job after {_fmt('wall_time', after)} (wall_time + grace + {BACKSTOP_SLACK:g}s), as its "
                        "supervisor did not act in time")
    return [v]


def decide(ev: Evidence) -> JobResult:
    messages, protocol_errors = ev.pump.channel.messages()
    results = [m for m in messages if isinstance(m, ResultMessage)]
    final = results[-1] if results else None
    explained: dict[int, str] = {}  # id(violation) -> its reason, where _breach_reason's would mislead
    violations = _backstop_violation(ev, explained) + ev.violations + _kernel_violations(ev)
    violations += _disk_violation(ev, violations)
    limits, exit_, notes = ev.limits, ev.exit, list(ev.notes)
    reported_ok = final is not None and final.status == "ok" and exit_.code == 0
    claimed = final.result_bytes if reported_ok else None
    if claimed is not None and ev.hold_result is not None and (limits.max_result is None or claimed <= limits.max_result):
        refusal = ev.hold_result(claimed)
        if refusal is not None:  # not read at all: nothing of it is held
            unheld = Violation(at=time.time(), pid=None, resource="result", limit=refusal[0], observed=claimed,
                               action="none", detected_by="supervisor")
            violations.append(unheld)
            explained[id(unheld)], claimed = refusal[1], None
    loaded = load_result(ev.plan.workdir, claimed, limits.max_result)
    if loaded.over_limit is not None:
        violations.append(Violation(at=time.time(), pid=None, resource="result", limit=limits.max_result,
                                    observed=loaded.size, action="none", detected_by=loaded.over_limit))
    if loaded.error is not None:
        final = final.model_copy(update={"status": "error", "error_type": "ResultError",
                                         "error_message": loaded.error})
    kernel_cpu = ev.cgroup_final.cpu_seconds if ev.cgroup_final is not None else None
    cpu = max(ev.peak.cpu, exit_.cpu_seconds, kernel_cpu or 0.0)

    def rlimit_hit(resource: str, limit: float, observed: float) -> None:
        violations.append(Violation(at=time.time(), pid=ev.root_pid, resource=resource, limit=limit,
                                    observed=observed, action="none", detected_by="rlimit"))

    sigxcpu_reported = any(isinstance(m, RlimitMessage) and m.resource == "cpu_time" for m in messages)
    killed_at_hard_limit = (exit_.signal in (signal.SIGXCPU, signal.SIGKILL) and limits.cpu_time is not None
                            and exit_.cpu_seconds >= math.ceil(limits.cpu_time))
    if limits.cpu_time is not None and (sigxcpu_reported or (killed_at_hard_limit and not violations)):
        rlimit_hit("cpu_time", limits.cpu_time, cpu)
    if (final is not None and final.status == "error" and not violations and "as" in ev.plan.rlimits
            and (final.error_type == "MemoryError"
                 or any(k in (final.error_message or "").lower() for k in AS_ERROR_MARKERS))):
        refused, explained[id(refused)] = _refused_allocation(limits, ev.plan.rlimits["as"][0], ev.peak.vms, final,
                                                              ev.root_pid)
        violations.append(refused)
    breaking = [v for v in violations if v.action != "warn"]
    foreign = foreign_oom(ev.cgroup_final, ev.cgroup_limits) if not breaking else None
    signame = signal_name(exit_.signal) if exit_.signal else None
    if breaking:
        verdict = Verdict(breaking[0].resource)
        reason = explained.get(id(breaking[0])) or _breach_reason(breaking[0])
    elif ev.termination is not None and ev.termination.reason == "cancelled":
        verdict, reason = Verdict.cancelled, ev.termination.detail or "cancelled by request"
    elif ev.termination is not None and ev.termination.reason == "preempted":
        verdict, reason = Verdict.preempted, ev.termination.detail
    elif ev.termination is not None and ev.termination.reason == "lease":
        verdict, reason = Verdict.crashed, ev.termination.detail
    elif final is not None and final.status == "ok" and exit_.code == 0:
        verdict, reason = Verdict.ok, ""
    elif final is not None and final.status == "error":
        verdict = Verdict.error
        reason = f"{final.error_type}: {final.error_message}".splitlines()[0][:300]
    elif signame is not None and foreign is not None and exit_.signal == signal.SIGKILL:
        verdict, reason = Verdict.crashed, f"killed by the kernel under node memory pressure ({signame}; {foreign})"
    elif signame is not None:
        verdict, reason = Verdict.crashed, f"killed by {signame} {_after(final)}"
    elif exit_.code is None:
        verdict, reason = Verdict.crashed, "the fork-server died before the job ended; exit status unknown"
    elif exit_.code == 0:
        verdict, reason = Verdict.ok, ""
        notes.append("no result message: the job left through os._exit(0)")
    else:
        verdict, reason = Verdict.error, f"exited with status {exit_.code} {_after(final)}"
    if foreign is not None and not reason.startswith("killed by the kernel"):
        notes.append(f"the kernel OOM-killed process(es) of the job under node memory pressure: {foreign}")
    ti_init = [m.model_dump(exclude={"type"}) for m in messages if isinstance(m, TiInitMessage)]
    notes.extend(filter(None, [arch_override(ti_init, ev.plan.ti_arch)]))
    for m in messages:
        if isinstance(m, LeftoversMessage):
            notes.append(f"killed {m.count} leftover process(es) after the main process ended (the job's "
                         "PID namespace init did; reported on the channel)")
    if protocol_errors:
        notes.extend(protocol_errors)
        if final is None and verdict in (Verdict.ok, Verdict.error):
            verdict, reason = Verdict.crashed, f"malformed result channel: {protocol_errors[0]}"
    kernel_peak = ev.cgroup_final.memory_peak if ev.cgroup_final is not None else None
    pump = ev.pump
    usage = Usage(cpu_seconds=round(cpu, 4), wall_seconds=round(ev.wall, 4),
                  peak_rss=max(ev.peak.rss, exit_.max_rss), peak_vms=ev.peak.vms,
                  peak_memory=kernel_peak if kernel_peak is not None else ev.peak.memory,
                  peak_processes=ev.peak.processes, peak_gpu_memory=ev.peak_gpu, output_bytes=pump.output_bytes(),
                  peak_disk=None if ev.disk_final is None else max(ev.disk_final, ev.peak.disk or 0))
    return JobResult(
        job_id=ev.spec.job_id, kernel=ev.spec.kernel, arch=ev.plan.ti_arch, verdict=verdict, reason=reason,
        exit_code=exit_.code, signal=signame,
        violations=sorted(violations + ev.warnings, key=lambda v: v.at),
        usage=usage, limits=limits, notes=notes,
        return_value=loaded.value if verdict is Verdict.ok else None,
        error_type=final.error_type if final else None, error_message=final.error_message if final else None,
        traceback=final.traceback if final else None,
        stdout_tail=pump.tail("stdout"), stderr_tail=pump.tail("stderr"),
        stdout_bytes=pump.counts["stdout"], stderr_bytes=pump.counts["stderr"],
        ti_init=ti_init,
        timeline=ev.timeline, termination=ev.termination, launcher=ev.launcher,
        labels=ev.spec.labels, started_at=ev.started_epoch, ended_at=time.time())


def foreign_oom(stats: CgroupStats | None, limits: CgroupLimits | None) -> str | None:
    """The evidence when the kernel OOM-killed a process of the job although the job's own cgroup
    never hit its memory limit: the OOM was an ancestor cgroup's or the host's (node memory
    pressure), not the job's. None otherwise."""
    if stats is None or not stats.oom_kills or own_limit_oom(stats, limits or CgroupLimits()):
        return None
    peak = f"its cgroup peak {_fmt('memory', stats.memory_peak)}" if stats.memory_peak is not None else \
        "its cgroup peak unknown"
    limit = f"below its limit {_fmt('memory', limits.memory)}" if limits is not None and limits.memory is not None \
        else "it has no memory limit of its own"
    return (f"{peak}, {limit}; the job's cgroup counted {stats.oom_kills} OOM kill(s) and no hit of its own limit: "
            "the OOM was an ancestor cgroup's or the host's")


def arch_override(ti_init: list[dict], ran_on: str) -> str | None:
    """A warning when the job's own ti.init asked for another arch than the sandbox gave it."""
    asked = [m["requested"].get("arch", "") for m in ti_init if "arch" in m["clamped"]]
    if not asked:
        return None
    wanted = "gpu" if asked[0].startswith("[") else asked[0].removeprefix("Arch.")
    wanted = {"x64": "cpu", "arm64": "cpu"}.get(wanted, wanted)
    return (f"WARNING: the job's ti.init asked for arch={wanted} but it ran on {ran_on}, the arch the sandbox "
            f"was given; run it with arch={wanted} (CLI: --arch {wanted}) to get that arch")


def _refused_allocation(limits: Limits, rlimit_as: int, peak_vms: int, final: ResultMessage,
                        pid: int) -> tuple[Violation, str]:
    """The violation and reason for an allocation RLIMIT_AS refused (the job raised MemoryError).
    An RLIMIT_AS that `address_space = "auto"` derived from the memory limit makes it a `memory`
    verdict; the reason says which limit refused how much (the size where the error names it, as
    numpy's does) and never shows a usage figure as if it had passed the limit. `observed` is the
    address space the allocation needed: over the limit, as it was refused."""
    asked = ALLOCATION_SIZE.search(final.error_message or "")
    size = f"an allocation of {asked.group(1)} {asked.group(2)}" if asked else "an allocation"
    needed = max(rlimit_as, peak_vms + (_size(asked) or 0))
    mapped = f" with at least {_fmt('address_space', peak_vms)} already mapped" if peak_vms else ""
    refused = f"refused {size}{mapped} ({final.error_type})"
    if limits.address_space == "auto" and limits.memory is not None:
        reason = f"memory limit {_fmt('memory', limits.memory)}: the address-space limit it implies (RLIMIT_AS " \
                 f"{_fmt('address_space', rlimit_as)}: Taichi's floor + the memory limit, address_space auto) {refused}"
        resource, limit = "memory", limits.memory
    else:
        how = ", auto: Taichi's floor + 8 GiB as no memory limit is set" if limits.address_space == "auto" else ""
        reason = f"address_space limit {_fmt('address_space', rlimit_as)} (RLIMIT_AS{how}) {refused}"
        resource, limit = "address_space", rlimit_as
    return Violation(at=time.time(), pid=pid, resource=resource, limit=limit, observed=needed, action="none",
                     detected_by="rlimit"), reason


def _size(asked: re.Match | None) -> int | None:
    if asked is None:
        return None
    try:
        return parse_size(f"{float(asked.group(1))}{'B' if asked.group(2) == 'bytes' else asked.group(2)}")
    except ValueError:
        return None


def _breach_reason(v: Violation) -> str:
    if v.detected_by == "cgroup" and v.resource == "memory":
        return f"memory limit {_fmt('memory', v.limit)} reached: the kernel OOM-killed the job " \
               f"(cgroup peak {_fmt('memory', v.observed)})"
    if v.resource == "result":
        return f"result limit {_fmt('result', v.limit)} exceeded: the return value takes at least " \
               f"{_fmt('result', v.observed)} ({v.detected_by}); raise max_result or return less"
    if v.resource == "disk":
        return f"disk limit {_fmt('disk', v.limit)} reached: the job's work dir held {_fmt('disk', v.observed)} " \
               f"({v.detected_by})"
    if v.detected_by == "cgroup" and v.resource == "processes":
        return f"processes limit reached: the kernel refused a fork at pids.max = {v.limit:g} tasks (cgroup)"
    if v.observed < v.limit:  # e.g. a polled figure behind the kernel's: the value would contradict the verdict
        return f"{v.resource} limit {_fmt(v.resource, v.limit)} reached ({v.detected_by})"
    return f"{v.resource} limit {_fmt(v.resource, v.limit)} exceeded: " \
           f"observed {_fmt(v.resource, v.observed)} ({v.detected_by})"


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # real-time signals have no name in the enum
        return f"SIG{number}"


def _after(final: ResultMessage | None) -> str:
    return "after reporting success" if final is not None else "without a result"


def _fmt(resource: str, value: float) -> str:
    if resource in ("memory", "address_space", "gpu_memory", "output", "result", "disk"):
        return f"{value / (1 << 20):.1f} MiB"
    if resource in ("cpu_time", "wall_time"):
        return duration(value)
    return f"{value:g}"
