"""The node service's jobs: who submitted each, its state, its output and live usage for clients
that follow it, the events stream and the audit context.

Lock rules: `Jobs._lock` guards only the job table; `OutputLog` (sandbox.node.holdings) and `Hub`
have their own locks.
None of them is held while calling the executor, the audit log or a client socket, and the
callbacks from jobs (`write`, `on_sample`, `finish`) never block on a client.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.audit import AuditLog
from ..core.limits import ConfigError, Policy
from ..core.models import JobResult, JobSpec, Sample, Verdict
from ..job.backstop import BACKSTOP_SLACK
from ..job.inputs import Sent
from ..job.safefs import remove_tree
from . import protocol
from .auth import Peer
from .executor import QueueFull
from .guard import Guard
from .holdings import Descriptors, OutputLog, Spool, close_fds
from .supervisor import Supervisor

FINISHED_OUTPUT_KEEP = 64 << 10  # characters of output kept per finished job (holdings.OUTPUT_KEEP: running)
KEEP_FINISHED = 1000  # finished jobs kept for `ps`, `logs` and `cancel` answers
EVENTS_BACKLOG = 10000  # events buffered per `events` client; older ones are dropped (and counted)


@dataclass(eq=False)
class JobRecord:
    """One job the service admitted (or refused at admission), and who submitted it. `inputs`: the
    descriptors the client sent (closed once the job started); `files`: its output files, for the
    client that follows the job; `guard`: what counts the bytes its return value holds until the
    follower has it."""

    spec: JobSpec
    peer: Peer
    source: bytes | None
    inputs: Descriptors = field(default_factory=Descriptors)
    files: Spool = field(default_factory=Spool)
    held: int = 0  # bytes of the request counted against the submitter by the service's guard
    guard: Guard | None = None
    held_result: int = 0  # bytes of its return value counted against the submitter, until dropped
    followed: bool = False  # a client follows the job: it still needs the result once the job ends
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    submitted: float = field(default_factory=time.time)
    state: str = "queued"  # queued, running, done
    sample: Sample | None = None
    result: JobResult | None = None
    output: OutputLog = field(default_factory=OutputLog)
    future: Any = None  # the executor's JobFuture
    watchers: set[threading.Event] = field(default_factory=set)

    def notify(self) -> None:
        for event in list(self.watchers):
            event.set()

    def cancel(self) -> None:
        """Cancel it (a no-op once it ended)."""
        future = self.future  # None once its record is slimmed
        if future is not None:
            future.cancel()

    def lease(self, deadline: float | None, lost: str | None) -> None:
        """Its cluster lease ends at `deadline` (time.monotonic()), or was `lost` (see JobFuture.lease;
        a no-op once it ended)."""
        future = self.future
        if future is not None and not future.done():
            future.lease(deadline, lost)

    def hold_result(self, size: int) -> tuple[int, str] | None:
        """Before the supervisor reads a return value of `size` bytes: count it against the
        submitter while a follower still needs it (None), or (the bound, why) it cannot be held."""
        with self._lock:
            if not self.followed or self.guard is None:
                return None  # nobody will fetch it: dropped when the job ends
        try:
            self.guard.hold(self.peer.uid, 0, size, "result")
        except QueueFull as err:
            return (self.guard.settings.max_held_bytes_per_uid,
                    f"return value not kept for its client: {err}; read results as they come, or return less")
        with self._lock:
            self.held_result += size
        return None

    def abandon(self) -> None:
        """Its follower is gone before its result: cancel it and drop its output files."""
        self.files.close()
        self.cancel()
        self.unfollow()

    def unfollow(self) -> None:
        """Its follower has its result, or is gone."""
        with self._lock:
            self.followed, done = False, self.result is not None
        if done:
            self._drop()

    def ended(self) -> None:
        """Called once its result is set."""
        with self._lock:
            followed = self.followed
        if not followed:
            self._drop()

    def _drop(self) -> None:
        """What a finished job no longer needs (kept up to KEEP_FINISHED times): its arguments,
        shipped code and source, its future, and the return value nobody will fetch (given back to
        the guard, once)."""
        with self._lock:
            held, self.held_result = self.held_result, 0
        if held:
            self.guard.hold(self.peer.uid, 0, -held)
        self.source, self.future = None, None
        self.spec = self.spec.model_copy(update={"args": [], "kwargs": {}, "shipped": None, "env": {}})
        if self.result is not None and self.result.return_value is not None:
            self.result = self.result.model_copy(update={"return_value": None})

    def row(self) -> dict:
        """The job for `ps`: id, tenant, user, state, usage, and why a queued job waits for real memory."""
        s = self.sample
        usage = {"cpu": s.cpu, "wall": s.t, "rss": s.rss, "memory": s.memory, "processes": s.processes,
                 "output": s.output} if s is not None else None
        return {"job_id": self.spec.job_id, "tenant": self.spec.tenant, "user": self.peer.user,
                "uid": self.peer.uid, "state": self.state, "kernel": self.spec.kernel, "usage": usage,
                "submitted": self.submitted,
                "waiting": getattr(self.future, "waiting", None) if self.state == "queued" else None}


class Subscriber:
    """One `events` client's backlog."""

    def __init__(self, accepts: Callable[[dict], bool]) -> None:
        self.accepts, self.ready = accepts, threading.Event()
        self.backlog: collections.deque[dict] = collections.deque(maxlen=EVENTS_BACKLOG)
        self.dropped = 0


class Hub:
    """Verdicts and alerts as they happen, to every subscribed `events` client that may see them."""

    def __init__(self) -> None:
        self._subscribers: set[Subscriber] = set()
        self._lock = threading.Lock()

    def subscribe(self, accepts: Callable[[dict], bool]) -> Subscriber:
        sub = Subscriber(accepts)
        with self._lock:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    def publish(self, event: dict) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for sub in subscribers:
            if sub.accepts(event):
                if len(sub.backlog) == sub.backlog.maxlen:
                    sub.dropped += 1
                sub.backlog.append(event)
                sub.ready.set()


class Jobs:
    """The service's job table: queued and running jobs, and the last KEEP_FINISHED finished ones."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._table: dict[str, JobRecord] = {}
        self._finished: collections.deque[str] = collections.deque()
        self._lock = threading.Lock()

    def add(self, record: JobRecord) -> None:
        with self._lock:
            self._table[record.spec.job_id] = record

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._table.get(job_id)

    def all(self) -> list[JobRecord]:
        with self._lock:
            return list(self._table.values())

    def discard(self, record: JobRecord) -> None:
        with self._lock:
            self._table.pop(record.spec.job_id, None)

    def active(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return len(self._table) - len(self._finished)

    def audit_context(self, job_id: str | None) -> dict:
        record = self.get(job_id) if job_id else None
        return record.peer.audit() if record is not None else {}

    def finish(self, record: JobRecord, result: JobResult, exit_status: int) -> None:
        """Record the verdict, wake its followers, publish it, and forget the oldest finished job."""
        record.result, record.state = result, "done"
        record.output.trim(FINISHED_OUTPUT_KEEP)
        record.notify()
        self.hub.publish({"type": "verdict", "job_id": result.job_id, "tenant": record.spec.tenant,
                          "uid": record.peer.uid, "user": record.peer.user, "verdict": result.verdict.value,
                          "reason": result.reason, "exit_status": exit_status, "ts": time.time()})
        with self._lock:
            self._finished.append(record.spec.job_id)
            while len(self._finished) > KEEP_FINISHED:
                self._table.pop(self._finished.popleft(), None)


def follow_lease(policy: Policy, records: list[JobRecord], message: dict) -> None:
    """A `lease` frame on the connection that follows `records` (protocol.Lease): the job's run ends
    with its lease, earlier by what its grace needs beyond the `room` the lease allows. Raises
    ProtocolError for a bad frame or a job the connection does not follow."""
    request = protocol.parse_lease(message)
    record = next((r for r in records if r.spec.job_id == request.job_id), None)
    if record is None:
        raise protocol.ProtocolError("NotFound", f"job {request.job_id!r}: not a job this connection follows")
    if request.lost is not None:
        record.lease(None, f"its cluster lease lapsed: {' '.join(request.lost.split())}")
        return
    try:
        grace = policy.resolve(record.spec.profile, record.spec.tenant, record.spec.limits, record.spec.job_type).grace
    except ConfigError:
        grace = 0.0  # its run is refused the same way
    sooner = max(0.0, grace + BACKSTOP_SLACK + 1 - request.room)
    record.lease(time.monotonic() + request.seconds - sooner, None)


def outcome(record: JobRecord, future, launcher: str, cancelled: str) -> tuple[JobResult, bool]:
    """The result of a finished executor future, and whether it still needs an audit record (a job
    cancelled in the queue, or a supervisor failure, has none yet). `cancelled`: why a queued job
    was cancelled."""
    spec = record.spec
    try:
        return future.result(), False
    except CancelledError:
        verdict, reason = Verdict.cancelled, cancelled
    except Exception as err:  # noqa: BLE001 - the sandbox failed, not the job: a verdict all the same
        verdict, reason = Verdict.crashed, f"internal error: {type(err).__name__}: {err}"
    return JobResult.not_run(spec, verdict, reason, launcher=launcher), True


class NodeAudit(AuditLog):
    """The audit log, with who submitted the job (uid, user, host, client pid) in every record about it."""

    def __init__(self, path: str | Path, context: Callable[[str | None], dict]) -> None:
        super().__init__(path)
        self._context = context

    def append(self, records: list[dict], sync: bool = True, keep: bool = True) -> None:
        super().append([{**r, **self._context(r.get("job_id"))} for r in records], sync, keep)


class NodeSupervisor(Supervisor):
    """The Supervisor of the service's executor: runs a service job with what its client sent (the
    kernel file's contents, input descriptors) and streams its output and usage to its record (its
    audit records, `started` included, carry who submitted it). Output files are collected into
    `spool` (root's alone), opened for the client, and unlinked."""

    def __init__(self, jobs: Jobs, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.jobs = jobs
        self.audit = NodeAudit(self.audit.path, jobs.audit_context)
        self.spool = self.policy.settings.resolved_state_dir() / "spool"
        remove_tree(self.spool)  # what a killed service left
        self.spool.mkdir(mode=0o700, parents=True)

    def run(self, spec: JobSpec, on_sample=None, control=None, queued: dict | None = None, **kwargs) -> JobResult:
        record = self.jobs.get(spec.job_id)
        if record is None:
            return super().run(spec, on_sample, control, queued=queued, **kwargs)
        record.state = "running"
        record.notify()

        def sampled(sample: Sample) -> None:
            record.sample = sample
            record.notify()

        def output(stream: str, data: bytes) -> None:
            record.output.write(stream, data)
            record.notify()
        inputs = record.inputs.copies()  # the record keeps its own until the job ends for good (a requeue)
        spool = Path(spec.output_dir) if spec.output_dir is not None else None
        handed = requeued = False
        try:
            result = super().run(spec, sampled, control, sent=Sent(record.source, tuple(inputs)), on_output=output,
                                 hold_result=record.hold_result, queued=queued)
            requeued = control is not None and control.requeue and result.verdict is Verdict.preempted
            if spool is not None and not requeued:
                record.files.put(spool, [_owned(copy, spool, record.peer) for copy in result.outputs
                                         if os.path.isfile(copy)])
                handed = True
            return result
        finally:
            close_fds(inputs)
            if requeued:
                record.state = "queued"
                record.output.write("stderr", b"taichi-sandbox: preempted; back in the queue\n")
            else:
                record.inputs.close()
                record.source = None  # not kept in memory once the job has its copy
            if spool is not None and not handed:
                remove_tree(spool)


def _owned(copy: str, spool: Path, peer: Peer) -> tuple[str, int]:
    """(name relative to `spool`, size) of an output file's copy, given to the client's uid: bytes it
    keeps alive by holding the descriptor count against its own disk quota, not root's."""
    if os.geteuid() == 0:
        os.chown(copy, peer.uid, peer.gid)
    return os.path.relpath(copy, spool), os.stat(copy).st_size
