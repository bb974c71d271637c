"""`taichi-sandbox serve`: the node service. One SandboxExecutor for the node behind a UNIX socket.

Contract:
- The socket is `[service] socket`, `--socket`, or /run/taichi-sandbox/sandbox.sock as root and
  $XDG_RUNTIME_DIR/taichi-sandbox.sock otherwise; mode 0660, group `[service] group`. A socket
  passed by systemd (LISTEN_FDS) is used as is. READY=1 goes to $NOTIFY_SOCKET once it listens.
- Each client is its kernel credentials (SO_PEERCRED, see `auth`); requests are frames (`frames`)
  validated by `protocol`; a bad frame gets an error answer, never a traceback, and the service
  stays up. At most `max_connections` connections in all and `max_connections_per_uid` per uid (more
  are answered TooManyConnections and closed); per uid a request token bucket (`request_rate`,
  `request_burst`; RateLimited). A request
  must arrive whole within `request_timeout` and begin within `idle_timeout`; a client that does
  not read its answers for `request_timeout` is dropped. At most `max_queued` jobs are queued or
  running (QueueFull), besides each tenant's own `max_queued`.
- Files: input files come as descriptors the client opened (checked: readable regular files, see
  `inputs.check_sent_input`), held until the job ends: at most `max_input_files_per_uid` per uid and
  half the service's RLIMIT_NOFILE (raised at start) in all, so no uid can use up the file table.
  Output files are collected into the service's spool and handed to the following client as
  descriptors. A followed job whose client goes away is cancelled.
- SIGHUP reloads the policy (`reload`): a bad file keeps the old one; queued jobs are checked again.
- SIGTERM/SIGINT drain: stop admitting, cancel queued jobs, let running ones finish for
  `drain_timeout`, cancel the rest (verdict `cancelled`), then exit 0. Jobs die with the service
  even on SIGKILL (the fork-server kills them when its control socket closes). On start, jobs the
  audit log shows submitted or started but never finished get an `aborted` record.
- OOM: the service sets its oom_score_adj to -900, the fork-server -800, each job +500 (root with
  CAP_SYS_RESOURCE only can lower it; without, the service says so and stays as it was).
Threads: the main thread accepts; one thread per connection (its answers: `streams`); the
executor's workers run jobs. One service per state dir (`statelock`). The bounds per uid and for
the node are `guard`'s.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from ..core.audit import AuditUnavailable
from ..core.limits import ConfigError, Policy, load_policy
from ..core.models import EXIT_USAGE
from ..job.child import set_oom_score_adj
from ..job.inputs import MAX_INPUT_BYTES, MAX_INPUTS, check_sent_input
from . import frames, protocol
from .auth import Peer, Refused, check_names, is_operator, may_use, peer_of, sees, tenant_for, within_rights
from .executor import QueueFull, SandboxExecutor
from .guard import Guard
from .holdings import Descriptors, close_fds
from .jobs import Hub, JobRecord, Jobs, NodeSupervisor, follow_lease, outcome
from .metrics import job_gauges
from .reconcile import reconcile
from .statelock import lock_state_dir
from .streams import Stream
from .systemd import gid_of, listen, sd_notify, socket_path


SERVICE_OOM_SCORE_ADJ = -900  # the kernel's last choice (the fork-server's is -800, jobs' +500)


class Service:
    """The node service over one policy. `serve()` blocks until SIGTERM/SIGINT, then drains."""

    def __init__(self, policy: Policy, socket_path: Path) -> None:
        self.unprotected = set_oom_score_adj(SERVICE_OOM_SCORE_ADJ)  # before the fork-server starts: it inherits
        self.policy, self.settings, self.path = policy, policy.service, socket_path
        self._lock = lock_state_dir(policy.settings.resolved_state_dir())  # before anything touches it
        self.hub = Hub()
        self.jobs = Jobs(self.hub)
        self.supervisor = NodeSupervisor(self.jobs, policy)
        self.aborted = reconcile(self.supervisor.audit)
        self.executor = SandboxExecutor(supervisor=self.supervisor, alert_hook=self.hub.publish)
        self.guard = Guard(self.settings)
        self.executor.metrics.watch("jobs", lambda: job_gauges(
            (r.spec.tenant or "", r.state, r.submitted, r.sample and (r.sample.memory or r.sample.rss))
            for r in self.jobs.all()))
        self._threads: set[threading.Thread] = set()
        self._stop = threading.Event()
        self._reload = threading.Event()  # SIGHUP: reload the policy (on the main thread)
        self.draining = False
        self._cancel_reason = "cancelled by its client before it started"

    # --- accepting -------------------------------------------------------------------------------

    def serve(self) -> None:
        endpoint = self.settings.metrics_endpoint()
        if endpoint is not None:
            try:
                self.executor.metrics.serve(endpoint[1], endpoint[0])
            except OSError as err:
                raise ConfigError(f"[service] metrics_address {endpoint[0]}:{endpoint[1]}: cannot serve /metrics "
                                  f"there: {err.strerror or err}") from None
        listener, created = listen(self.path, self.settings.group)
        listener.setblocking(False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        sd_notify("READY=1")
        print(f"taichi-sandbox: serving on {self.path} (pid {os.getpid()}; {len(self.aborted)} aborted job(s) "
              "found in the audit log)", file=sys.stderr, flush=True)
        if self.unprotected is not None:
            print(f"taichi-sandbox: not protected from the OOM killer: {self.unprotected}", file=sys.stderr, flush=True)
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                if sel.select(timeout=0.2):
                    self._accept(listener)
                if self._reload.is_set():
                    self._reload.clear()
                    self.reload()
        listener.close()
        if created:
            self.path.unlink(missing_ok=True)
        self.drain()

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError as err:
            if err.errno in (errno.EMFILE, errno.ENFILE):
                time.sleep(0.1)  # no descriptor to accept with: wait for one rather than spin
            return
        try:
            peer = peer_of(conn)
        except OSError:
            conn.close()
            return
        refusal = self.guard.connect(peer.uid)
        if refusal is not None:
            conn.setblocking(False)
            self._answer(conn, "TooManyConnections", refusal)
            conn.close()
            return
        thread = threading.Thread(target=self._serve_connection, args=(conn, peer), daemon=True,
                                  name=f"tsbx-conn-{peer.uid}")
        self._threads.add(thread)
        thread.start()

    def _answer(self, conn: socket.socket, code: str, message: str) -> None:
        """An error answer, counted as a refused request (an idle connection is closed, not refused);
        best effort: the client may be gone."""
        if code != "IdleTimeout":
            self.executor.metrics.refused(code)
        try:
            frames.send(conn, protocol.error(code, message))
        except OSError:
            pass

    def _serve_connection(self, conn: socket.socket, peer: Peer) -> None:
        fds: list[int] = []  # descriptors that came with the current request; closed unless a job took them
        stream = Stream(conn, self.settings.request_timeout)
        try:
            while not self._stop.is_set():
                close_fds(fds)
                fds.clear()
                try:
                    message = frames.recv(conn, self.settings.max_request_bytes or 1 << 30,
                                          idle=self.settings.idle_timeout, within=self.settings.request_timeout,
                                          fds=fds)
                except frames.FrameError as err:
                    self._answer(conn, err.code, err.message)
                    if err.code != "BadFrame":
                        return  # the stream cannot be resynchronised (or the client is too slow)
                    continue
                if message is None:
                    return
                if not self.guard.rate_allows(peer.uid):
                    self._answer(conn, "RateLimited", f"uid {peer.uid}: more than {self.settings.request_rate:g} "
                                                      "requests/s ([service] request_rate)")
                    continue
                try:
                    request = protocol.parse(message)
                    if not isinstance(request, protocol.Submit):
                        close_fds(fds)  # only a submit's inputs come with descriptors
                        fds.clear()
                    self._dispatch(stream, peer, request, fds)
                except protocol.ProtocolError as err:
                    self._answer(conn, err.code, str(err))
                    self._audit_refusal(peer, err.code, str(err), message.get("op") if isinstance(message, dict)
                                        else None)
        except OSError:
            pass  # the client went away or stopped reading
        except Exception as err:  # noqa: BLE001 - a bug here must not reach the client as a traceback
            print(f"taichi-sandbox: internal error serving uid {peer.uid}: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
            self._answer(conn, "Internal", f"internal error: {type(err).__name__}: {err}")
        finally:
            close_fds(fds)
            conn.close()
            self.guard.disconnect(peer.uid)
            self._threads.discard(threading.current_thread())

    # --- requests --------------------------------------------------------------------------------

    def _dispatch(self, stream: Stream, peer: Peer, request, fds: list[int]) -> None:
        if isinstance(request, protocol.Submit):
            self._submit(stream, peer, request, fds)
        elif isinstance(request, protocol.Ps):
            everything = is_operator(self.policy, peer)
            rows = [r.row() for r in self.jobs.all() if r.state != "done" and (everything or self._may_see(peer, r))]
            stream.send({"type": "ps", "jobs": sorted(rows, key=lambda row: row["submitted"])})
        elif isinstance(request, protocol.Cancel):
            record = self._visible(peer, request.job_id)
            record.cancel()
            stream.send({"type": "cancelled", "job_id": request.job_id, "state": record.state})
        elif isinstance(request, protocol.Logs):
            stream.logs(self._visible(peer, request.job_id), request.follow)
        elif isinstance(request, protocol.Events):
            everything = is_operator(self.policy, peer)
            stream.events(self.hub, lambda event: everything or event.get("uid") == peer.uid
                          or may_use(self.policy, peer, event.get("tenant") or ""), self._stop)
        else:
            stream.send({"type": "quota", "state": self._quota_for(peer)})

    def _quota_for(self, peer: Peer) -> dict:
        """The quota report: the node's totals, and the tenants `peer` may see (`auth.sees`)."""
        state = self.executor.quota_state()
        state["tenants"] = {name: row for name, row in state["tenants"].items() if sees(self.policy, peer, name)}
        return state

    def _may_see(self, peer: Peer, record: JobRecord) -> bool:
        return record.peer.uid == peer.uid or may_use(self.policy, peer, record.spec.tenant or "")

    def _visible(self, peer: Peer, job_id: str) -> JobRecord:
        record = self.jobs.get(job_id)
        if record is None or not self._may_see(peer, record):
            raise protocol.ProtocolError("NotFound", f"job {job_id!r}: no such job (or not yours)")
        return record

    def _submit(self, stream: Stream, peer: Peer, request: protocol.Submit, fds: list[int]) -> None:
        """Admit each job, answer `submitted`, then follow them if asked. The jobs take `fds` (their
        inputs' descriptors, in order); those of refused jobs are closed."""
        wanted = sum(len(job.input_names()) for job in request.jobs)
        if wanted != len(fds):
            raise protocol.ProtocolError("BadRequest", f"{wanted} inputs named, {len(fds)} file descriptors came with "
                                                       "the request: send each input's open descriptor, never a path")
        answers, records = [], []
        for number, job in enumerate(request.jobs, 1):
            mine = fds[:len(job.input_names())]
            del fds[:len(mine)]
            try:
                record = self._admit(peer, job, number, mine, request.follow)
            except BaseException as err:
                close_fds(mine)
                if not isinstance(err, (Refused, ConfigError, protocol.ProtocolError, QueueFull, AuditUnavailable)):
                    raise
                code = getattr(err, "code", type(err).__name__)
                self.executor.metrics.refused(code)
                answers.append({"job_id": None, "state": "refused", "code": code, "reason": str(err)})
                self._audit_refusal(peer, code, str(err), "submit", job.tenant)
                continue
            records.append(record)
            result = record.result
            answers.append({"job_id": record.spec.job_id, "tenant": record.spec.tenant,
                            "state": "rejected" if result is not None else "queued",
                            "reason": result.reason if result is not None else ""})
        try:
            stream.send({"type": "submitted", "jobs": answers})
        except BaseException:
            if request.follow:  # the client left before following: its jobs end with it
                for record in records:
                    record.abandon()
            raise
        if request.follow:
            stream.follow(records, request.output, request.samples,
                          on_frame=lambda message: follow_lease(self.policy, records, message))

    def _audit_refusal(self, peer: Peer, code: str, message: str, op: str | None, tenant: str | None = None) -> None:
        """A `refused` audit record for a request (or one job of it) the service refused after the
        request rate limit let it through (so a flood cannot fill the log). Not fsync'ed, and dropped
        when the log cannot be written: only the counter then has it."""
        try:
            record = {"type": "refused", "ts": time.time(), "op": op, "code": code, "reason": message, "tenant": tenant,
                      **peer.audit()}
            self.supervisor.audit.append([record], sync=False, keep=False)
        except OSError:
            pass

    def _admit(self, peer: Peer, job: protocol.JobRequest, number: int, inputs: list[int],
               followed: bool) -> JobRecord:
        """The admitted job's record, which then owns `inputs`; raises (leaving them) when refused."""
        if self.draining:
            raise protocol.ProtocolError("Draining", "the service is shutting down: no new jobs")
        spec = job.spec(tenant_for(self.policy, peer, job.tenant), number, self.supervisor.spool)
        spec = within_rights(self.policy, spec)
        if len(inputs) > MAX_INPUTS:
            raise ConfigError(f"job {number}: {len(inputs)} inputs, more than {MAX_INPUTS} per job")
        total = sum(check_sent_input(name, fd) for (_, name), fd in zip(spec.inputs, inputs))
        if total > MAX_INPUT_BYTES:
            raise ConfigError(f"job {number}: inputs of {total} bytes in all, more than {MAX_INPUT_BYTES} per job")
        if self.settings.max_queued is not None and self.jobs.active() >= self.settings.max_queued:
            raise QueueFull(f"the node has {self.jobs.active()} jobs queued or running ([service] max_queued="
                            f"{self.settings.max_queued})")
        record = JobRecord(spec, peer, job.source.encode() if job.source is not None else None, Descriptors(inputs),
                           followed=followed, guard=self.guard)
        held = len(record.source or b"") + len(json.dumps(job.model_extra or {}))  # args, kwargs, shipped
        self.guard.hold(peer.uid, len(inputs), held)
        record.held = held
        self.jobs.add(record)  # before submit: a worker may start it at once
        try:
            record.future = self.executor.submit(spec, quiet=True)  # output goes to its client
        except BaseException as err:  # e.g. the audit record of a rejection could not be written
            self.jobs.discard(record)
            self.guard.hold(peer.uid, -len(inputs), -record.held)
            if isinstance(err, RuntimeError):  # the executor shut down under us
                raise protocol.ProtocolError("Draining", "the service is shutting down: no new jobs") from None
            raise
        record.future.add_done_callback(lambda future: self._finished(record, future))
        return record

    def _finished(self, record: JobRecord, future) -> None:
        """The executor's callback for a job's end: whatever fails here, the job gets its verdict."""
        record.inputs.close()  # a job cancelled in the queue never took them
        self.guard.hold(record.peer.uid, -len(record.spec.inputs), -record.held)
        result, unrecorded = outcome(record, future, self.supervisor.launcher.name, self._cancel_reason)
        try:
            if unrecorded:
                self.supervisor.audit.record(result, record.spec.tenant, record.spec.job_type)
        except OSError as err:
            print(f"taichi-sandbox: cannot write the audit record of job {result.job_id}: {err}", file=sys.stderr,
                  flush=True)
        finally:
            self.jobs.finish(record, result, result.exit_status)
            record.ended()

    # --- reloading -------------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: read the limits file again. A file that does not validate leaves the policy as it
        was; else the new one applies to every job not started yet (see `SandboxExecutor.reload`).
        [sandbox] and [service] apply only at a restart (the state dir, socket and bounds in use stay).
        One line to the log either way."""
        try:
            policy = load_policy(self.policy.source)
            check(policy, self.path)
        except ConfigError as err:
            print(f"taichi-sandbox: reload failed, keeping the previous policy: {err}", file=sys.stderr, flush=True)
            return
        kept = [table for table, field in (("[sandbox]", "settings"), ("[service]", "service"))
                if getattr(policy, field) != getattr(self.policy, field)]
        policy = policy.model_copy(update={"settings": self.policy.settings, "service": self.policy.service})
        rejected = self.executor.reload(policy)
        self.policy = policy
        self.supervisor.audit.event({"type": "service", "event": "reloaded", "ts": time.time(), "pid": os.getpid(),
                                     "source": policy.source, "rejected": rejected})
        print(f"taichi-sandbox: reloaded {policy.source}: {len(policy.tenants)} tenants, {rejected} queued job(s) "
              f"rejected by the new ceilings" + (f"; {' and '.join(kept)} changed: applied at the next restart"
                                                 if kept else ""), file=sys.stderr, flush=True)

    # --- stopping --------------------------------------------------------------------------------

    def drain(self) -> None:
        """Stop admitting, cancel queued jobs, give running ones `drain_timeout`, cancel the rest."""
        sd_notify("STOPPING=1")
        self.draining = True
        self._cancel_reason = "cancelled before it started: the service is shutting down"
        self.executor.shutdown(wait=False, cancel_futures=True)
        timeout = self.settings.drain_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(r.state == "running" for r in self.jobs.all()) and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.05)
        for record in self.jobs.all():
            if record.state == "running" and (future := record.future) is not None:
                future.control.cancel(f"cancelled: the service's drain timeout ({timeout:g}s) ran out at shutdown")
        self.executor.shutdown(wait=True, cancel_running=True)
        end = time.monotonic() + 2.0  # followers get their verdicts
        for thread in list(self._threads):
            thread.join(max(0.0, end - time.monotonic()))
        self.supervisor.audit.event({"type": "service", "event": "stopped", "ts": time.time(), "pid": os.getpid()})
        self.supervisor.close()


def check(policy: Policy, path: Path) -> str:
    """What `serve --check` verifies beyond the policy itself. Raises ConfigError."""
    check_names(policy)
    for key in ("group", "operators_group"):
        if getattr(policy.service, key):
            gid_of(getattr(policy.service, key), key)
    return (f"{policy.source}: ok (socket {path}, {len(policy.tenants)} tenants, "
            f"{sum(1 for t in policy.tenants.values() if t.users or t.groups)} with users/groups, "
            f"unknown users: {policy.service.unknown_users})")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="taichi-sandbox serve", description="Run the node service (foreground).")
    parser.add_argument("--socket", help="UNIX socket path (default: [service] socket, else /run/taichi-sandbox/"
                                         "sandbox.sock as root, $XDG_RUNTIME_DIR/taichi-sandbox.sock otherwise)")
    parser.add_argument("--limits-file", help="limits.toml (default: $TAICHI_SANDBOX_LIMITS or ./limits.toml)")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    args = parser.parse_args(argv)
    try:
        policy = load_policy(args.limits_file)
        path = socket_path(args.socket or policy.service.socket)
        if args.check:
            print(check(policy, path))
            return 0
        check(policy, path)
        Service(policy, path).serve()
    except ConfigError as err:
        print(f"taichi-sandbox: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # e.g. no audit log to reconcile into: systemd retries
        print(f"taichi-sandbox: error: cannot start: {err}", file=sys.stderr)
        return 1
    return 0
