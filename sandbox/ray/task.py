"""The Ray task body: attach the job's lease to this node, keep it, supervise the job here (or have
the node service run it), release the lease. See sandbox.ray for the whole path."""

from __future__ import annotations

import atexit
import contextlib
import json
import signal
import threading
import time
from typing import Any, Callable

from .. import remote
from ..core.limits import ConfigError, Policy
from ..core.models import JobResult, JobSpec, Verdict
from ..job.backstop import BACKSTOP_SLACK
from ..node.supervisor import Supervisor
from ..watch.echo import Echo
from ..watch.monitor import JobControl
from .actor import authority, forget
from .keeper import Held, keeper, node_deadline
from .options import _ray
from .outcome import failure_verdict, granted

CANCEL_RESEND = 2.0  # seconds between soft cancels of a task that has not ended
WAIT_SLICE = 0.05
_worker_supervisors: dict[str, Supervisor] = {}
_worker_lock = threading.Lock()


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


def run_in_task(spec_json: str, policy_json: str, service: str | None = "auto", quiet: bool = False,
                grant: dict | None = None) -> str:
    """The Ray task body: supervise one job here, or have the node service run it (see sandbox.ray);
    return its JobResult as JSON. `grant`: the authority's answer to the job's `acquire` (Ray resolved
    it before starting the task); the task attaches the lease to this node (waiting while the node's
    memory is reserved), keeps it renewed while the job runs, and releases it. Without a grant
    (a task started other than by `submit`) the job is `rejected`: nothing runs outside the quotas. Unless `quiet`, the
    job's output goes to the worker's stdout and stderr as it comes, which Ray shows on the driver's.

    The job runs in a helper thread while this (the task's main) thread waits in short slices, so
    Ray's soft cancel (KeyboardInterrupt) arrives at once; it cancels the job and the task waits for
    the graceful termination before re-raising.
    """
    started = time.time()
    spec = JobSpec.model_validate_json(spec_json)
    spec = spec.model_copy(update={"labels": {**spec.labels, **_labels()}})
    if threading.current_thread() is threading.main_thread():
        # Ray's soft cancel is SIGINT; a worker started from a background shell inherits it ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    control = JobControl()
    if not isinstance(grant, dict):
        return JobResult.not_run(spec, Verdict.rejected, "no lease from the quota authority: start Ray jobs with "
                                 "sandbox.ray.submit or RayExecutor", started).model_dump_json()
    refused = granted(spec, grant, started)
    if refused is not None:
        return refused.model_dump_json()
    policy = Policy.model_validate_json(policy_json)
    try:
        grace = policy.resolve(spec.profile, spec.tenant, spec.limits, spec.job_type).grace
    except ConfigError:
        grace = spec.limits.grace  # the supervisor rejects the job in a moment
    try:  # the lease is released however this ends (a cancel may come while it is attached)
        lease, problem = _attach(spec, grant, started, grace + BACKSTOP_SLACK + 1)
        if problem is not None:
            return problem.model_dump_json()
        socket_path = None if service is None else remote.choose_socket(None if service == "auto" else service)
        if socket_path is not None:
            return _through_service(socket_path, spec, lease)
        _keep(lease, on_renewed=control.lease_until, on_lost=control.lease_lost)
        supervisor = _worker_supervisor(policy_json)

        def body() -> str:
            with contextlib.nullcontext() if quiet else Echo() as echo:
                return supervisor.run(spec, control=control, on_output=echo).model_dump_json()
        return _cancellable(body, control.cancel, spec.job_id)
    finally:
        keeper(authority).drop(grant["granted"], release=True)


def _attach(spec: JobSpec, grant: dict, started: float, room: float) -> tuple[tuple | None, JobResult | None]:
    """Attach the granted lease to this node: ((lease id, ttl, room, first node-side deadline), None),
    or (None, the job's verdict) when the lease is gone or the authority cannot answer. `room`: the
    seconds the node needs to end the job (see keeper.node_deadline)."""
    ray = _ray()
    ctx = ray.get_runtime_context()
    lease_id, ttl = grant["granted"], grant["ttl"]  # the authority's ttl: also for re-creating it
    for attempt in range(2):  # a worker's handle may name an authority killed for good: look it up again
        sent = time.monotonic()
        try:
            # a future, not ray.get: a task blocked in ray.get lends its CPU to Ray, which then starts
            # more workers (each with a fork-server to start) than the node has CPUs
            answer = authority(ttl).attach.remote(lease_id, ctx.get_node_id(), keeper(authority).holder,
                                                  None, room).future().result()
            break
        except ray.exceptions.RayError as err:
            if isinstance(err, ray.exceptions.RayActorError):
                forget()
            if attempt or not isinstance(err, ray.exceptions.RayActorError):
                verdict, reason = failure_verdict(err)
                return None, JobResult.not_run(spec, verdict, reason, started)
    if "lost" in answer:
        return None, granted(spec, answer, started)
    # renewed by the authority as it answered, `waited` after it got the call (it may wait for room)
    return (lease_id, ttl, room, node_deadline(sent + answer.get("waited", 0.0), ttl, room)), None


def _keep(lease: tuple, on_renewed: Callable[[float], None] | None, on_lost: Callable[[str], None]) -> None:
    """Keep `lease` renewed from this worker; `on_renewed` gets its first deadline at once."""
    lease_id, ttl, room, first = lease
    if on_renewed is not None:
        on_renewed(first)
    keeper(authority).keep(lease_id, Held(ttl=ttl, on_renewed=on_renewed, on_lost=on_lost, room=room))


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


def _through_service(path, spec: JobSpec, lease: tuple) -> str:
    """Run `spec` through the node service at `path`, following it to its verdict (JSON). A job the
    service refuses, or a service that cannot be reached, is verdict `rejected`; one lost mid-way
    (the service went away) is `crashed`. The job's lease is renewed from here; when the authority
    says it is gone, or when this worker stops renewing it (frozen), the service ends the job
    (verdict `crashed`): each renewal's deadline is forwarded to it (`_ServiceLease`)."""
    fields = spec.model_dump(mode="json", exclude_defaults=True,
                             exclude={"job_id", "kernel", "inputs", "outputs", "output_dir", "shipped"})
    if spec.shipped is not None:
        fields["shipped"] = spec.shipped.model_dump()
    submitted: dict[str, Any] = {}
    started = time.time()
    forward = _ServiceLease(lease[2])

    def on_answer(answer: dict) -> None:
        if answer["type"] == "submitted":
            submitted.update(answer["jobs"][0])
            forward.submitted(submitted.get("job_id"))

    def follow() -> str:
        job = remote.Job(spec.kernel, inputs=spec.inputs, output_dir=spec.output_dir, outputs=spec.outputs,
                         **fields)
        try:
            answer, results = remote.submit_and_follow(path, [job], output=False, on_answer=on_answer,
                                                       on_open=forward.opened)
        except remote.ClientError as err:
            lost = err.code == remote.EXIT_INTERNAL
            return JobResult.not_run(spec, Verdict.crashed if lost else Verdict.rejected, str(err),
                                     started).model_dump_json()
        if not results:
            refused = answer["jobs"][0]
            return JobResult.not_run(spec, Verdict.rejected, f"the node service refused the job: {refused.get('code')}: "
                                                             f"{refused.get('reason')}", started).model_dump_json()
        return json.dumps(results[0]["result"])

    def cancel(reason: str | None = None) -> None:
        deadline = time.monotonic() + CANCEL_RESEND
        while not submitted.get("job_id") and time.monotonic() < deadline:
            time.sleep(WAIT_SLICE)  # not yet admitted: a moment, then the connection's end cancels it
        if submitted.get("job_id"):
            try:
                remote.one(path, {"op": "cancel", "job_id": submitted["job_id"]})
            except remote.ClientError:
                pass  # the job ended meanwhile, or the service is gone with it
    _keep(lease, on_renewed=forward.renewed, on_lost=forward.lost)
    try:
        return _cancellable(follow, cancel, spec.job_id)
    finally:
        forward.close()


class _ServiceLease:
    """Forwards a job's lease to the node service that runs it, as `lease` frames on the connection
    that follows the job (no connection of its own): the newest deadline (or its loss) once the
    service has named the job, from a thread of its own, so the worker's keeper never waits on the
    service. The service ends the job when the deadline passes unrenewed: a frozen worker cannot
    keep it running past its lease. `room`: what the authority allows the node to end the job."""

    def __init__(self, room: float) -> None:
        self._room = room
        self._cv = threading.Condition()
        self._send: Callable[[dict], None] | None = None
        self._job_id: str | None = None
        self._pending: dict | None = None  # the next frame's lease fields
        self._lost = False
        self._closed = False
        threading.Thread(target=self._sending, name="tsbx-service-lease", daemon=True).start()

    def opened(self, send: Callable[[dict], None]) -> None:
        self._set(send=send)

    def submitted(self, job_id: str | None) -> None:
        self._set(job_id=job_id)

    def renewed(self, deadline: float) -> None:
        self._set(pending={"deadline": deadline})

    def lost(self, reason: str) -> None:
        self._set(pending={"lost": reason[:300]})

    def close(self) -> None:
        self._set(closed=True)

    def _set(self, **fields) -> None:
        with self._cv:
            if not self._lost:  # once lost, it stays lost
                self._pending = fields.get("pending", self._pending)
                self._lost = "lost" in (self._pending or {})
            self._send = fields.get("send", self._send)
            self._job_id = fields.get("job_id", self._job_id)
            self._closed = fields.get("closed", self._closed)
            self._cv.notify()

    def _sending(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._closed or (self._send and self._job_id and self._pending))
                if self._closed:
                    return
                send, job_id, pending, self._pending = self._send, self._job_id, self._pending, None
            frame = {"op": "lease", "job_id": job_id}
            if "lost" in pending:
                frame["lost"] = pending["lost"]
            else:
                frame.update(seconds=max(0.0, pending["deadline"] - time.monotonic()), room=self._room)
            try:
                send(frame)
            except OSError:
                return  # the connection is gone: the service cancels the job it followed
