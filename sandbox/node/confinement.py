"""What confinement the supervisor gives a job, decided before it starts from the policy and what
this host offers: namespaces and the tenant's uid (`isolate`), the system-call filter
(`filter_syscalls`) and the job's cgroup (`job_cgroup`). Each raises ConfigError where the policy
requires what is missing, so the job is rejected rather than run with less."""

from __future__ import annotations

import os
from pathlib import Path

from ..core.limits import ConfigError, Limits, Policy, Settings
from ..job import syscalls
from ..job.cgroup import CgroupError, CgroupHost, CgroupLimits, JobCgroup, task_limit
from ..job.child import ChildPlan
from ..job.ids import may_read, tenant_ids
from ..job.ticache import TenantCache
from ..watch.enforcement import CgroupFacts, IsolationFacts, cgroup_facts


def isolate(policy: Policy, no_namespaces: str | None, plan: ChildPlan, tenant: str, limits: Limits,
            workdir: Path, kept: TenantCache, notes: list[str]) -> IsolationFacts:
    """Namespaces and the tenant's own uid for the job, where this supervisor can give them (and
    the tenant's group to `kept`, whose kernels the job may read). `no_namespaces`: why jobs cannot
    get their own namespaces here (Supervisor.namespaces_unavailable), or None.
    Raises ConfigError when the policy requires what is missing, or when the job would run as
    root without `allow_root`."""
    settings = policy.settings
    if no_namespaces is not None and settings.isolation == "required":
        raise ConfigError(f'isolation is required ([sandbox] isolation = "required") but {no_namespaces}')
    plan.isolate, plan.network, plan.tmpfs_bytes = no_namespaces is None, limits.network, limits.memory
    plan.read_only = plan.isolate and settings.rootfs == "read-only"
    if no_namespaces is not None:
        notes.append(f"no namespaces: {no_namespaces}")
    plan.expose = [(str(kept.path), False), (str(workdir), True)]
    if plan.target.endswith(".py"):
        plan.expose.append((plan.target, False))
    if os.geteuid() != 0:
        return IsolationFacts(plan.isolate, limits.network, no_namespaces or "",
                              f"jobs run as the supervisor's uid {os.geteuid()} (not root): tenants share it",
                              user_namespace=plan.isolate, read_only=plan.read_only)
    if settings.allow_root:
        notes.append("WARNING: the job runs as root (allow_root = true)")
        return IsolationFacts(plan.isolate, limits.network, no_namespaces or "",
                              "allow_root = true: jobs run as root and can reach everything root can",
                              read_only=plan.read_only)
    if not plan.isolate:
        raise ConfigError(f"the job would run as root: it can only run as its tenant's uid in its own namespaces "
                          f"({no_namespaces}); set [sandbox] allow_root = true to run it as root anyway")
    ids = tenant_ids(policy, tenant)
    if plan.target.endswith(".py") and not may_read(plan.target, ids):
        raise ConfigError(f"kernel file {plan.target} is not readable by the job's uid {ids.uid}: make it "
                          "readable by others, or give the tenant its owner's uid (run_as)")
    for path in (*workdir.iterdir(), workdir):  # workdir last: from then on the tenant could swap its entries
        os.chown(path, ids.uid, ids.gid, follow_symlinks=False)
    kept.group = ids.gid
    plan.uid, plan.gid = ids.uid, ids.gid
    return IsolationFacts(True, limits.network, "", tenant_uid=f"uid {ids.uid}", read_only=plan.read_only)


def filter_syscalls(settings: Settings, plan: ChildPlan) -> dict[str, str]:
    """Give the job the system-call filter (sandbox.job.syscalls) unless the policy turns it
    off; returns the IsolationFacts fields saying which. A filter that cannot be installed here
    rejects the job (ConfigError): "default" never silently runs a job unfiltered."""
    if settings.syscall_filter == "off":
        return {"syscall_filter": "off", "syscalls_note": 'off by policy ([sandbox] syscall_filter = "off")'}
    why = syscalls.unavailable()
    if why is not None:
        raise ConfigError(f'the system-call filter is on ([sandbox] syscall_filter = "default") but {why}; '
                          'set syscall_filter = "off" to run jobs without it')
    plan.syscall_filter = True
    return {"syscall_filter": "hard", "syscalls_note": ""}


def job_cgroup(host: CgroupHost, settings: Settings, job_id: str, limits: Limits, threads: int,
               helpers: int) -> tuple[JobCgroup | None, CgroupFacts]:
    """The job's cgroup, or None and why; with `[sandbox] cgroups = "required"` a job whose limits
    the kernel cannot enforce here is rejected (ConfigError). `helpers`: the sandbox's own
    processes in the job (relay and init), allowed on top of `max_processes`."""
    required = settings.cgroups == "required"
    wanted = {"memory": limits.memory, "processes": limits.max_processes, "cpu_time": limits.cpu_time,
              "cpu_threads": limits.cpu_threads}
    missing = [name for name, value in wanted.items() if value is not None and name not in host.enforces()]
    if required and (host.version is None or missing):
        what = f"{host.label} cannot enforce {', '.join(missing)}" if host.version else "unavailable"
        raise ConfigError(f'cgroups are required ([sandbox] cgroups = "required") but {what}: {host.reason}')
    if host.version is None:
        return None, CgroupFacts(reason=host.reason)
    try:
        processes = limits.max_processes + helpers if limits.max_processes is not None else None
        wanted_limits = CgroupLimits(memory=limits.memory, tasks=task_limit(processes, threads),
                                     cpus=limits.cpu_threads)
        cgroup = host.create(job_id, wanted_limits)
    except CgroupError as err:
        if required:
            raise ConfigError(f"cgroups are required but the job cgroup failed: {err}") from None
        return None, CgroupFacts(reason=f"job cgroup not created: {err}")
    return cgroup, cgroup_facts(host)
