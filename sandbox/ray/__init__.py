"""Run sandboxed jobs inside Ray tasks. Ray is optional (`pip install taichi-sandbox[ray]`) and
imported lazily; nothing here calls `ray.init`.

Inside each task a Supervisor (one per worker process, with its own fork-server started by exec:
the worker itself is never forked) supervises the job exactly as on one node. Limits map onto Ray
resources through `.options()`:

| sandbox                | Ray option       | note                                                      |
| ---------------------- | ---------------- | --------------------------------------------------------- |
| `cpu_threads` (else 1) | `num_cpus`       | also clamps Taichi's `cpu_max_num_threads`                |
| `gpu_memory`           | `num_gpus`       | fraction of the device (fractional limits as given, bytes ÷ `device_memory`); non-CPU arch without a limit: 1 |
| `memory`               | `memory`         | placement only: Ray never enforces it; the sandbox does   |
| -                      | `max_retries=0`  | a violated limit is a verdict, not a reason to run again  |

`ray.cancel(ref)` ends the job gracefully (SIGTERM, grace, SIGKILL) and returns promptly even while
a kernel runs; `force=True` or a killed worker closes the fork-server's control socket, which makes it
SIGKILL every job process.

On a node with a running node service (`taichi-sandbox serve`), a task submits its job there instead
(`service="auto"`, the default: $TAICHI_SANDBOX_SOCKET on the worker, else the default socket when a
service answers; or a socket path; or None for never). Then the node's policy, admission and quotas
apply to Ray jobs and local users alike, and the tenant is authenticated from the worker's uid; the
`policy` given here only sizes the Ray resources. The task reads the kernel file and inputs with the
worker's permissions and writes the outputs itself; a cancelled task cancels its job, and a killed
worker's job is cancelled when its connection closes.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import signal
import threading
import time
from typing import Any, Callable

from .. import remote
from ..core.limits import ConfigError, Limits, Policy
from ..core.models import JobResult, JobSpec, Verdict, as_spec
from ..node.executor import Capacity, SandboxExecutor
from ..node.supervisor import Supervisor
from ..watch.echo import Echo
from ..watch.monitor import JobControl

CANCEL_RESEND = 2.0  # seconds between soft cancels of a task that has not ended
WAIT_SLICE = 0.05
_worker_supervisors: dict[str, Supervisor] = {}
_worker_lock = threading.Lock()


def _ray():
    try:
        import ray
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("taichi-sandbox's Ray executor needs Ray: pip install 'taichi-sandbox[ray]'") from err
    return ray


def resource_options(spec: JobSpec, limits: Limits, device_memory: int | None = None) -> dict[str, Any]:
    """Ray `.options()` for a job with these (effective) limits; see the module table."""
    options: dict[str, Any] = {"num_cpus": limits.cpu_threads or 1, "max_retries": 0}
    if limits.memory is not None:
        options["memory"] = limits.memory
    if spec.arch != "cpu":
        if isinstance(limits.gpu_memory, float):
            options["num_gpus"] = limits.gpu_memory
        elif isinstance(limits.gpu_memory, int) and device_memory:
            options["num_gpus"] = min(1.0, math.ceil(100 * limits.gpu_memory / device_memory) / 100)
        else:
            options["num_gpus"] = 1
    return options


def _worker_supervisor(policy_json: str) -> Supervisor:
    with _worker_lock:
        sup = _worker_supervisors.get(policy_json)
        if sup is None:
            sup = _worker_supervisors[policy_json] = Supervisor(Policy.model_validate_json(policy_json))
            atexit.register(sup.close)
        return sup


def _labels() -> dict[str, str]:
    ctx = _ray().get_runtime_context()
    resources = ctx.get_assigned_resources()
    return {"ray_job_id": str(ctx.get_job_id()), "ray_task_id": str(ctx.get_task_id()),
            "ray_node_id": str(ctx.get_node_id()), "ray_worker_id": str(ctx.get_worker_id()),
            "ray_resources": ",".join(f"{k}={v:g}" for k, v in sorted(resources.items()))}


def run_in_task(spec_json: str, policy_json: str, service: str | None = "auto", quiet: bool = False) -> str:
    """The Ray task body: supervise one job here, or have the node service run it (see the module
    docstring); return its JobResult as JSON. Unless `quiet`, the job's output goes to the worker's
    stdout and stderr as it comes, which Ray shows on the driver's.

    The job runs in a helper thread while this (the task's main) thread waits in short slices, so
    Ray's soft cancel (KeyboardInterrupt) arrives at once; it cancels the job and the task waits for
    the graceful termination before re-raising.
    """
    spec = JobSpec.model_validate_json(spec_json)
    spec = spec.model_copy(update={"labels": {**spec.labels, **_labels()}})
    if threading.current_thread() is threading.main_thread():
        # Ray's soft cancel is SIGINT; a worker started from a background shell inherits it ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    socket_path = None if service is None else remote.choose_socket(None if service == "auto" else service)
    if socket_path is not None:
        return _through_service(socket_path, spec)
    supervisor = _worker_supervisor(policy_json)
    control = JobControl()

    def body() -> str:
        with contextlib.nullcontext() if quiet else Echo() as echo:
            return supervisor.run(spec, control=control, on_output=echo).model_dump_json()
    return _cancellable(body, control.cancel, spec.job_id)


def _cancellable(body: Callable[[], str], cancel: Callable[[], None], job_id: str) -> str:
    """`body()` in a helper thread; a KeyboardInterrupt here calls `cancel()`, waits for `body` to
    end and is re-raised."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = body()
        except BaseException as err:  # noqa: BLE001 - re-raised in the task thread
            outcome["error"] = err

    thread = threading.Thread(target=target, name=f"tsbx-ray-{job_id}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(WAIT_SLICE)
    except KeyboardInterrupt:
        cancel()
        thread.join()
        raise
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _through_service(path, spec: JobSpec) -> str:
    """Run `spec` through the node service at `path`, following it to its verdict (JSON). A job the
    service refuses, or a service that cannot be reached, is verdict `rejected`; one lost mid-way
    (the service went away) is `crashed`."""
    fields = spec.model_dump(mode="json", exclude_defaults=True,
                             exclude={"job_id", "kernel", "inputs", "outputs", "output_dir", "shipped"})
    if spec.shipped is not None:
        fields["shipped"] = spec.shipped.model_dump()
    submitted: dict[str, Any] = {}
    started = time.time()

    def follow() -> str:
        job = remote.Job(spec.kernel, inputs=spec.inputs, output_dir=spec.output_dir, outputs=spec.outputs,
                         **fields)
        try:
            answer, results = remote.submit_and_follow(
                path, [job], output=False,
                on_answer=lambda a: submitted.update(a["jobs"][0]) if a["type"] == "submitted" else None)
        except remote.ClientError as err:
            lost = err.code == remote.EXIT_INTERNAL
            return JobResult.not_run(spec, Verdict.crashed if lost else Verdict.rejected, str(err),
                                     started).model_dump_json()
        if not results:
            refused = answer["jobs"][0]
            return JobResult.not_run(spec, Verdict.rejected, f"the node service refused the job: {refused.get('code')}: "
                                                             f"{refused.get('reason')}", started).model_dump_json()
        return json.dumps(results[0]["result"])

    def cancel() -> None:
        deadline = time.monotonic() + CANCEL_RESEND
        while not submitted.get("job_id") and time.monotonic() < deadline:
            time.sleep(WAIT_SLICE)  # not yet admitted: a moment, then the connection's end cancels it
        if submitted.get("job_id"):
            try:
                remote.one(path, {"op": "cancel", "job_id": submitted["job_id"]})
            except remote.ClientError:
                pass  # the job ended meanwhile, or the service is gone with it
    return _cancellable(follow, cancel, spec.job_id)


def submit(spec: JobSpec | Callable, policy: Policy | None = None, device_memory: int | None = None,
           service: str | None = "auto", quiet: bool = False, **ray_options):
    """Start `spec` (or a callable, shipped to the job: see sandbox.core.shipping) as a Ray task; returns an
    ObjectRef to the JobResult's JSON (use `result()`, which keeps numpy arrays in the return value).

    `service`: the node service socket the task submits through ("auto", a path, or None: never; see
    the module docstring). Unless `quiet`, the job's output appears on the driver's console as Ray
    shows its workers' output (not when it runs through a node service). `ray_options` override
    the mapping from limits (e.g. `num_gpus=1`).
    """
    ray = _ray()
    spec = as_spec(spec)
    if spec.binds:
        raise ConfigError("binds: a Ray task may run on another machine; bind directories only for jobs run in "
                          "this process (run_kernel)")
    policy = policy if policy is not None else Policy()
    limits = policy.resolve(spec.profile, spec.tenant, spec.limits, spec.job_type)
    options = {**resource_options(spec, limits, device_memory), **ray_options}
    task = ray.remote(run_in_task).options(name=f"taichi-sandbox:{spec.job_id}", **options)
    ref = task.remote(spec.model_dump_json(), policy.model_dump_json(), service, quiet)
    with _submitted_lock:
        _submitted[ref.hex()] = {"job_id": spec.job_id, "kernel": spec.kernel, "arch": spec.arch,
                                 "labels": spec.labels}
    return ref


_submitted: dict[str, dict] = {}  # what a result needs of each submitted job until `result()` has its verdict
_submitted_lock = threading.Lock()


def result(ref, timeout: float | None = None) -> JobResult:
    """`ray.get` the JobResult of a `submit()`ted job. A task cancelled with `force=True`, or whose
    worker died, has no result of its own: it gets verdict `cancelled` or `crashed` here (the job's
    fork-server, which outlives the worker, killed the job and wrote an `aborted` audit record)."""
    ray = _ray()
    try:
        value = JobResult.model_validate_json(ray.get(ref, timeout=timeout))
    except (ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError) as err:
        with _submitted_lock:
            spec = _submitted.pop(ref.hex(), None)
        if spec is None:
            raise
        cancelled = isinstance(err, ray.exceptions.TaskCancelledError)
        now = time.time()
        return JobResult(**spec, verdict=Verdict.cancelled if cancelled else Verdict.crashed,
                         started_at=now, ended_at=now,
                         reason="cancelled by request (Ray task cancelled)" if cancelled else
                         f"the Ray worker running the job died ({type(err).__name__})")
    with _submitted_lock:
        _submitted.pop(ref.hex(), None)
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


class _RaySupervisor:
    """Stands in for the local Supervisor inside RayExecutor: runs each job as a Ray task."""

    def __init__(self, policy: Policy, device_memory: int | None, ray_options: dict) -> None:
        self.policy, self.device_memory, self.ray_options = policy, device_memory, ray_options
        self._local = Supervisor(policy)  # audit log and GPU facts only; it never launches here
        self.audit, self.launcher = self._local.audit, self._local.launcher

    def gpu_facts(self):
        return self._local.gpu_facts()

    def run(self, spec: JobSpec, control: JobControl, on_output: Callable | None = None,
            queued: dict | None = None) -> JobResult:
        """The job's result from its Ray task (whose supervisor writes the audit record, without this
        driver's `queued`: its queue wait is unknown). Its output reaches the driver as Ray shows its
        workers' output, not through `on_output` (None: quiet)."""
        ray = _ray()
        ref = submit(spec, self.policy, self.device_memory, quiet=on_output is None, **self.ray_options)
        cancel_sent = 0.0
        while not ray.wait([ref], timeout=WAIT_SLICE)[0]:
            if control.cancelled and time.monotonic() - cancel_sent > CANCEL_RESEND:
                # soft: the task ends the job gracefully, then reports cancellation; sent again
                # while unanswered (Ray drops one that reaches a worker still starting the task)
                ray.cancel(ref)
                cancel_sent = time.monotonic()
        return result(ref)

    def close(self) -> None:
        self._local.close()


LEDGER_NAME, LEDGER_NAMESPACE = "taichi_sandbox_tenant_ledger", "taichi_sandbox"


class TenantLedger:
    """Cluster-wide tenant usage, held by one named, detached Ray actor that every RayExecutor (any
    driver) reserves from before it starts a job. Reservations are keyed by job id and tagged with
    the reserving driver's Ray job id; those of drivers that have died are dropped, so a crashed
    driver cannot hold a tenant's quota forever."""

    def __init__(self) -> None:
        self.reservations: dict[str, dict] = {}

    def _prune(self) -> None:
        try:
            from ray._private import state  # no public equivalent without the dashboard
            dead = {j["JobID"] for j in state.jobs() if j["IsDead"]}
        except Exception:  # noqa: BLE001 - without the job table nothing is pruned
            return
        self.reservations = {k: r for k, r in self.reservations.items() if r["driver"] not in dead}

    def usage(self) -> dict[str, dict[str, int]]:
        self._prune()
        out: dict[str, dict[str, int]] = {}
        for r in self.reservations.values():
            u = out.setdefault(r["tenant"], {"running": 0, "memory": 0, "gpu_memory": 0})
            u["running"] += 1
            u["memory"] += r["memory"]
            u["gpu_memory"] += r["gpu_memory"]
        return out

    def reserve(self, job_id: str, tenant: str, driver: str, memory: int, gpu_memory: int,
                max_concurrent: int | None, memory_quota: int | None, gpu_memory_quota: int | None) -> bool:
        """Take the job's share of the tenant's quotas if they all still hold; False otherwise."""
        used = self.usage().get(tenant, {"running": 0, "memory": 0, "gpu_memory": 0})
        if ((max_concurrent is not None and used["running"] + 1 > max_concurrent)
                or (memory_quota is not None and used["memory"] + memory > memory_quota)
                or (gpu_memory_quota is not None and used["gpu_memory"] + gpu_memory > gpu_memory_quota)):
            return False
        self.reservations[job_id] = {"tenant": tenant, "driver": driver, "memory": memory, "gpu_memory": gpu_memory}
        return True

    def release(self, job_id: str) -> None:
        self.reservations.pop(job_id, None)


def tenant_ledger():
    """The cluster's TenantLedger actor, created by the first caller."""
    ray = _ray()
    return ray.remote(num_cpus=0)(TenantLedger).options(
        name=LEDGER_NAME, namespace=LEDGER_NAMESPACE, lifetime="detached", get_if_exists=True).remote()


class RayExecutor(SandboxExecutor):
    """SandboxExecutor whose jobs run as Ray tasks. Capacity defaults to the Ray cluster's resources.
    Admission, priorities, alerts and metrics are the executor's; tenant quotas are checked against
    the cluster-wide TenantLedger actor too, so several drivers share them."""

    def __init__(self, max_concurrent: int | None = None, capacity: Capacity | None = None,
                 policy: Policy | None = None, device_memory: int | None = None, **kwargs) -> None:
        ray = _ray()
        self._ledger = tenant_ledger()
        self._driver = str(ray.get_runtime_context().get_job_id())
        policy = policy if policy is not None else Policy()
        if capacity is None:
            res = ray.cluster_resources()
            gpus = res.get("GPU", 0)
            capacity = Capacity(cpu_slots=int(res.get("CPU", 1)), memory=int(res.get("memory", 0)),
                                gpu_memory=int(gpus * device_memory) if gpus and device_memory else None)
        ray_options = kwargs.pop("ray_options", {})
        super().__init__(max_concurrent=max_concurrent or capacity.cpu_slots, capacity=capacity,
                         supervisor=_RaySupervisor(policy, device_memory, ray_options), **kwargs)
        self._owns_supervisor = True

    def _node_probe(self) -> None:
        """Jobs run on the cluster's nodes, not the driver's: each node's own service (where one runs)
        admits them against its real memory."""
        return None

    def _reserve(self, entry) -> bool:
        tenant = self._tenant(entry.future.tenant)
        return _ray().get(self._ledger.reserve.remote(
            entry.future.spec.job_id, entry.future.tenant, self._driver, entry.demand.memory,
            entry.demand.gpu_memory, tenant.max_concurrent, tenant.memory_quota, tenant.gpu_memory_quota))

    def _release(self, entry) -> None:
        _ray().get(self._ledger.release.remote(entry.future.spec.job_id))
