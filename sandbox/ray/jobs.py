"""Submitting one job as a Ray task, and its verdict: `submit`, `result`, `cancel`.

A submission first asks the quota authority for the job's lease (`acquire`, a call that returns when
the tenant's share allows the job) and starts the task with that call's ObjectRef as an argument:
Ray starts the task only once the lease is granted, so a waiting job holds no worker, no CPU and no
thread anywhere. Each submission has a lease of its own (the job's id and a random suffix: one
JobSpec submitted twice is two jobs to the quotas). This process renews the granted lease until the
task attaches it to its node (see sandbox.ray.keeper), and releases it when the task ends however it
ends, unless a node holds it: then its task released it (the job ended), or its node failed and
the lease lapses once the node has ended the job (the driver cannot know the job has ended there).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Callable

from ..core.limits import ConfigError, Policy
from ..core.models import JobResult, JobSpec, as_spec
from .actor import authority, forget
from .keeper import Held, keeper
from .options import _ray, gpu_bytes, resource_options
from .outcome import failed_result
from .task import CANCEL_RESEND, run_in_task

DEFAULT_TENANT = "_default"
_submitted: dict[str, dict] = {}  # what a result needs of each submitted job until `result()` has its verdict
_submitted_lock = threading.Lock()


def submit(spec: JobSpec | Callable, policy: Policy | None = None, device_memory: int | None = None,
           service: str | None = "auto", quiet: bool = False, priority: int | None = None, **ray_options):
    """Start `spec` (or a callable, shipped to the job: see sandbox.core.shipping) as a Ray task once
    the quota authority grants its lease; returns an ObjectRef to the JobResult's JSON (use `result()`,
    which keeps numpy arrays in the return value and turns every Ray failure into a verdict).

    `policy` gives the job's limits, its tenant's quotas (`max_concurrent`, `memory_quota`,
    `gpu_memory_quota`: cluster-wide) and `[cluster] lease_ttl`; `priority` orders the authority's
    waiters (default: the job's, its job type's, its tenant's). `service`: the node service socket the
    task submits through ("auto", a path, or None: never). Unless `quiet`, the job's output appears on
    the driver's console as Ray shows its workers' output. `ray_options` override the mapping from
    limits (e.g. `num_gpus=1`)."""
    _ray()  # Ray installed, or a clear ImportError
    spec = as_spec(spec)
    if spec.binds:
        raise ConfigError("binds: a Ray task may run on another machine; bind directories only for jobs run in "
                          "this process (run_kernel)")
    policy = policy if policy is not None else Policy()
    limits = policy.resolve(spec.profile, spec.tenant, spec.limits, spec.job_type)
    options = {**resource_options(spec, limits, device_memory), **ray_options}
    name = spec.tenant or DEFAULT_TENANT
    tenant = policy.tenants.get(name)
    quotas = {"max_concurrent": tenant.max_concurrent, "memory_quota": tenant.memory_quota,
              "gpu_memory_quota": tenant.gpu_memory_quota} if tenant is not None else {}
    ttl = policy.cluster.lease_ttl
    keep = keeper(authority)
    lease_id = f"{spec.job_id}-{uuid.uuid4().hex[:12]}"
    grant = authority(ttl).acquire.remote(lease_id, name, keep.holder, limits.memory,
                                          gpu_bytes(spec, limits, device_memory), quotas,
                                          policy.priority(name, spec.job_type, priority))
    try:
        task = _task().options(name=f"taichi-sandbox:{spec.job_id}", **options)
        ref = task.remote(spec.model_dump_json(), policy.model_dump_json(), service, quiet, grant)
    except BaseException:
        keep.drop(lease_id, release=True)  # no task will ever hold it
        raise
    with _submitted_lock:
        _submitted[ref.hex()] = {"lease_id": lease_id, "job": {"job_id": spec.job_id, "kernel": spec.kernel,
                                                               "arch": spec.arch, "labels": spec.labels}}
    keep.keep(lease_id, Held(ttl=ttl, until=ref))
    return ref


_remote = None


def _task():
    """`run_in_task` as a Ray remote function, made once (each new one is exported to the GCS again)."""
    global _remote
    if _remote is None:
        _remote = _ray().remote(run_in_task)
    return _remote


def result(ref, timeout: float | None = None) -> JobResult:
    """`ray.get` the JobResult of a `submit()`ted job; every failure is a verdict (see
    sandbox.ray.outcome): a cancelled task `cancelled`, a dead worker or node `crashed`, an authority
    that could not decide `rejected`, each with Ray's cause in the reason. Raises only Ray's
    GetTimeoutError (`timeout`) and, for a ref `submit` did not make, what `ray.get` raises."""
    ray = _ray()
    try:
        value = JobResult.model_validate_json(ray.get(ref, timeout=timeout))
    except ray.exceptions.GetTimeoutError:
        raise
    except ray.exceptions.RayError as err:
        with _submitted_lock:
            known = _submitted.pop(ref.hex(), None)
        if known is None:
            raise
        keeper(authority).drop(known["lease_id"], release=True, unbound_only=True)
        if isinstance(err, ray.exceptions.RayActorError):
            forget()
        return failed_result(known["job"], err)
    with _submitted_lock:
        known = _submitted.pop(ref.hex(), None)
    if known is not None:
        keeper(authority).drop(known["lease_id"], release=True, unbound_only=True)
    return value


def cancel(ref, force: bool = False, timeout: float = 30.0) -> JobResult:
    """Cancel a `submit()`ted job and return its verdict. The cancel is sent again every
    CANCEL_RESEND seconds until the task ends: Ray drops a soft cancel that reaches a worker still
    starting the task. Raises TimeoutError when the task outlives `timeout`."""
    ray = _ray()
    deadline = time.monotonic() + timeout
    while True:
        ray.cancel(ref, force=force)
        try:
            return result(ref, timeout=min(CANCEL_RESEND, max(0.0, deadline - time.monotonic())))
        except ray.exceptions.GetTimeoutError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the task ignored every cancel for {timeout:g} s") from None


class Canceller:
    """Soft cancels, each sent at once and again every CANCEL_RESEND s until its task ends (its
    verdict is collected by whoever waits for it), from one thread however many tasks are being
    cancelled; a task asked twice is cancelled once."""

    def __init__(self) -> None:
        self._refs: dict[str, object] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def cancel(self, ref) -> None:
        with self._lock:
            if ref.hex() in self._refs:
                return
            self._refs[ref.hex()] = ref
        self._send([ref])
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="tsbx-ray-cancel", daemon=True)
                self._thread.start()

    def _send(self, refs: list) -> None:
        for ref in refs:
            try:
                _ray().cancel(ref)
            except Exception:  # noqa: BLE001 - the task ended, or Ray is gone: nothing to resend
                self._drop([ref])

    def _loop(self) -> None:
        ray = _ray()
        while True:
            with self._lock:
                refs = list(self._refs.values())
                if not refs:
                    self._thread = None
                    return
            try:
                ended, _ = ray.wait(refs, num_returns=len(refs), timeout=CANCEL_RESEND)
            except Exception:  # noqa: BLE001 - Ray is gone
                ended = refs
            self._drop(ended)
            done = {ref.hex() for ref in ended}
            self._send([ref for ref in refs if ref.hex() not in done])

    def _drop(self, refs: list) -> None:
        with self._lock:
            for ref in refs:
                self._refs.pop(ref.hex(), None)
