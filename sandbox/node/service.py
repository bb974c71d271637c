"""`taichi-sandbox serve`: the node service. One SandboxExecutor for the node behind a UNIX socket.

Contract:
- The socket is `[service] socket`, `--socket`, or /run/taichi-sandbox/sandbox.sock as root and
  $XDG_RUNTIME_DIR/taichi-sandbox.sock otherwise; mode 0660, group `[service] group`. A socket
  passed by systemd (LISTEN_FDS) is used as is. READY=1 goes to $NOTIFY_SOCKET once it listens.
- Each client is its kernel credentials (SO_PEERCRED, see `auth`); requests are frames (`frames`)
  validated by `protocol`; a bad frame gets an error answer, never a traceback, and the service
  stays up. At most `max_connections` connections in all and `max_connections_per_uid` per uid (more
  are answered TooManyConnections and closed); per uid a request token bucket (`request_rate`, `request_burst`; RateLimited). A request
  must arrive whole within `request_timeout` and begin within `idle_timeout`; a client that does
  not read its answers for `request_timeout` is dropped. At most `max_queued` jobs are queued or
  running (QueueFull), besides each tenant's own `max_queued`.
- Files: input files come as descriptors the client opened (checked: readable regular files, see
  `files.check_sent_input`), held until the job ends: at most `max_input_files_per_uid` per uid and
  half the service's RLIMIT_NOFILE (raised to its hard limit at start) in all, so no uid can use up
  the file table. Output files are collected into the service's spool and handed to the following
  client as descriptors. A followed job whose client goes away is cancelled.
- SIGTERM/SIGINT drain: stop admitting, cancel queued jobs, let running ones finish for
  `drain_timeout`, cancel the rest (verdict `cancelled`), then exit 0. Jobs die with the service
  even on SIGKILL (the fork-server kills them when its control socket closes). On start, jobs the
  audit log shows started but never finished get an `aborted` record.
Threads: the main thread accepts; one thread per connection; the executor's workers run jobs.
Lock rule: `_lock` guards the per-uid counters only (connections, buckets, held descriptors), and
nothing is called while holding it.
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import select
import selectors
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from ..core.limits import ConfigError, Policy, load_policy
from ..core.models import EXIT_USAGE
from ..core.ratelimit import TokenBucket
from ..job.files import MAX_INPUT_BYTES, MAX_INPUTS, check_sent_input
from . import frames, protocol
from .auth import Peer, Refused, check_ceilings, check_names, may_use, peer_of, tenant_for
from .executor import QueueFull, SandboxExecutor
from .jobs import Descriptors, Hub, JobRecord, Jobs, NodeSupervisor, close_fds, outcome, reconcile
from .systemd import gid_of, listen, sd_notify, socket_path


FOLLOW_CHECK = 0.5  # seconds between checks that a following client is still there


def _raise_open_files() -> int:
    """Raise RLIMIT_NOFILE as far as allowed (root: to fs.nr_open; else to the hard limit); the new
    limit. Descriptors in flight (≤ frames.MAX_FDS per connection) then cannot use up the table."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard
    if os.geteuid() == 0:
        try:
            want = max(hard, int(Path("/proc/sys/fs/nr_open").read_text()))
        except (OSError, ValueError):
            pass
    for limit in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
        except (OSError, ValueError):
            continue
    return soft


def _gone(conn: socket.socket) -> bool:
    """Whether the client hung up (or shut its side down) on a connection it only reads from."""
    poller = select.poll()
    poller.register(conn, select.POLLIN | select.POLLRDHUP)
    events = poller.poll(0)
    if not events:
        return False
    if events[0][1] & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
        return True
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Service:
    """The node service over one policy. `serve()` blocks until SIGTERM/SIGINT, then drains."""

    def __init__(self, policy: Policy, socket_path: Path) -> None:
        self.policy, self.settings, self.path = policy, policy.service, socket_path
        self.hub = Hub()
        self.jobs = Jobs(self.hub)
        self.supervisor = NodeSupervisor(self.jobs, policy)
        self.aborted = reconcile(self.supervisor.audit)
        self.executor = SandboxExecutor(supervisor=self.supervisor, alert_hook=self.hub.publish)
        self._lock = threading.Lock()
        self._connections: dict[int, int] = {}
        self._buckets: dict[int, TokenBucket] = {}
        self._held: dict[int, int] = {}  # input descriptors held for each uid's unfinished jobs
        self._held_cap = max(MAX_INPUTS, _raise_open_files() // 2)
        self._threads: set[threading.Thread] = set()
        self._stop = threading.Event()
        self.draining = False
        self._cancel_reason = "cancelled by its client before it started"

    # --- accepting -------------------------------------------------------------------------------

    def serve(self) -> None:
        listener, created = listen(self.path, self.settings.group)
        listener.setblocking(False)
        if self.settings.metrics_port is not None:
            self.executor.metrics.serve(self.settings.metrics_port)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        sd_notify("READY=1")
        print(f"taichi-sandbox: serving on {self.path} (pid {os.getpid()}; {len(self.aborted)} aborted job(s) "
              "found in the audit log)", file=sys.stderr, flush=True)
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            while not self._stop.is_set():
                if sel.select(timeout=0.2):
                    self._accept(listener)
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
        with self._lock:
            count, total = self._connections.get(peer.uid, 0), sum(self._connections.values())
            if count >= (self.settings.max_connections_per_uid or 1 << 30):
                refusal = f"uid {peer.uid} already has {count} connections ([service] max_connections_per_uid)"
            elif total >= (self.settings.max_connections or 1 << 30):
                refusal = f"the service already has {total} connections ([service] max_connections)"
            else:
                refusal = None
                self._connections[peer.uid] = count + 1
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
        """An error answer; best effort: the client may be gone."""
        try:
            frames.send(conn, protocol.error(code, message))
        except OSError:
            pass

    def _rate_allows(self, uid: int) -> bool:
        rate = self.settings.request_rate
        if rate is None:
            return True
        burst = self.settings.request_burst or max(1, int(rate))
        with self._lock:
            return self._buckets.setdefault(uid, TokenBucket(rate, burst)).take()

    def _serve_connection(self, conn: socket.socket, peer: Peer) -> None:
        fds: list[int] = []  # descriptors that came with the current request; closed unless a job took them
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
                if not self._rate_allows(peer.uid):
                    self._answer(conn, "RateLimited", f"uid {peer.uid}: more than {self.settings.request_rate:g} "
                                                      "requests/s ([service] request_rate)")
                    continue
                try:
                    request = protocol.parse(message)
                    self._dispatch(conn, peer, request, fds)
                except protocol.ProtocolError as err:
                    self._answer(conn, err.code, str(err))
        except OSError:
            pass  # the client went away or stopped reading
        except Exception as err:  # noqa: BLE001 - a bug here must not reach the client as a traceback
            print(f"taichi-sandbox: internal error serving uid {peer.uid}: {type(err).__name__}: {err}",
                  file=sys.stderr, flush=True)
            self._answer(conn, "Internal", f"internal error: {type(err).__name__}: {err}")
        finally:
            close_fds(fds)
            conn.close()
            with self._lock:
                self._connections[peer.uid] -= 1
            self._threads.discard(threading.current_thread())

    def _send(self, conn: socket.socket, message: dict, fds: list[int] | tuple[int, ...] = ()) -> None:
        conn.settimeout(self.settings.request_timeout)
        frames.send(conn, message, fds)

    # --- requests --------------------------------------------------------------------------------

    def _dispatch(self, conn: socket.socket, peer: Peer, request, fds: list[int]) -> None:
        if isinstance(request, protocol.Submit):
            self._submit(conn, peer, request, fds)
        elif isinstance(request, protocol.Ps):
            rows = [r.row() for r in self.jobs.all() if r.state != "done" and self._may_see(peer, r)]
            self._send(conn, {"type": "ps", "jobs": sorted(rows, key=lambda row: row["submitted"])})
        elif isinstance(request, protocol.Cancel):
            record = self._visible(peer, request.job_id)
            if record.state != "done" and record.future is not None:
                record.future.cancel()
            self._send(conn, {"type": "cancelled", "job_id": request.job_id, "state": record.state})
        elif isinstance(request, protocol.Logs):
            self._logs(conn, self._visible(peer, request.job_id), request.follow)
        elif isinstance(request, protocol.Events):
            self._events(conn, peer)
        else:
            self._send(conn, {"type": "quota", "state": self.executor.quota_state()})

    def _may_see(self, peer: Peer, record: JobRecord) -> bool:
        return record.peer.uid == peer.uid or may_use(self.policy, peer, record.spec.tenant or "")

    def _visible(self, peer: Peer, job_id: str) -> JobRecord:
        record = self.jobs.get(job_id)
        if record is None or not self._may_see(peer, record):
            raise protocol.ProtocolError("NotFound", f"job {job_id!r}: no such job (or not yours)")
        return record

    def _submit(self, conn: socket.socket, peer: Peer, request: protocol.Submit, fds: list[int]) -> None:
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
                record = self._admit(peer, job, number, mine)
            except (Refused, ConfigError, protocol.ProtocolError, QueueFull) as err:
                close_fds(mine)
                code = getattr(err, "code", type(err).__name__)
                answers.append({"job_id": None, "state": "refused", "code": code, "reason": str(err)})
                continue
            records.append(record)
            result = record.result
            answers.append({"job_id": record.spec.job_id, "tenant": record.spec.tenant,
                            "state": "rejected" if result is not None else "queued",
                            "reason": result.reason if result is not None else ""})
        try:
            self._send(conn, {"type": "submitted", "jobs": answers})
            if request.follow:
                self._follow(conn, records, request.output, request.samples)
        except BaseException:
            if request.follow:  # the client left before following: its jobs end with it
                for record in records:
                    record.files.close()
                    if record.future is not None:
                        record.future.cancel()
            raise

    def _admit(self, peer: Peer, job: protocol.JobRequest, number: int, inputs: list[int]) -> JobRecord:
        """The admitted job's record, which then owns `inputs`; raises (leaving them) when refused."""
        if self.draining:
            raise protocol.ProtocolError("Draining", "the service is shutting down: no new jobs")
        spec = job.spec(tenant_for(self.policy, peer, job.tenant), number, self.supervisor.spool)
        check_ceilings(self.policy, spec)
        if len(inputs) > MAX_INPUTS:
            raise ConfigError(f"job {number}: {len(inputs)} inputs, more than {MAX_INPUTS} per job")
        total = sum(check_sent_input(name, fd) for name, fd in zip(spec.inputs, inputs))
        if total > MAX_INPUT_BYTES:
            raise ConfigError(f"job {number}: inputs of {total} bytes in all, more than {MAX_INPUT_BYTES} per job")
        if self.settings.max_queued is not None and self.jobs.active() >= self.settings.max_queued:
            raise QueueFull(f"the node has {self.jobs.active()} jobs queued or running ([service] max_queued="
                            f"{self.settings.max_queued})")
        record = JobRecord(spec, peer, job.source.encode() if job.source is not None else None, Descriptors(inputs))
        self._hold(peer.uid, len(inputs))
        self.jobs.add(record)  # before submit: a worker may start it at once
        try:
            record.future = self.executor.submit(spec)
        except (QueueFull, RuntimeError) as err:
            self.jobs.discard(record)
            self._hold(peer.uid, -len(inputs))
            if isinstance(err, QueueFull):
                raise
            raise protocol.ProtocolError("Draining", "the service is shutting down: no new jobs") from None
        record.future.add_done_callback(lambda future: self._finished(record, future))
        return record

    def _hold(self, uid: int, count: int) -> None:
        """Count `count` more (or, negative, fewer) input descriptors held for `uid`'s jobs; raises
        QueueFull past `max_input_files_per_uid` or the node's share of the file table."""
        per_uid = self.settings.max_input_files_per_uid or 1 << 30
        with self._lock:
            mine, total = self._held.get(uid, 0), sum(self._held.values())
            if count > 0 and mine + count > per_uid:
                refusal = (f"uid {uid} holds {mine} input files for its unfinished jobs "
                           f"([service] max_input_files_per_uid={per_uid})")
            elif count > 0 and total + count > self._held_cap:
                refusal = f"the node holds {total} input files for unfinished jobs (half its open-file limit)"
            else:
                refusal = None
                self._held[uid] = mine + count
        if refusal is not None:
            raise QueueFull(refusal)

    def _finished(self, record: JobRecord, future) -> None:
        """The executor's callback for a job's end: whatever fails here, the job gets its verdict."""
        record.inputs.close()  # a job cancelled in the queue never took them
        self._hold(record.peer.uid, -len(record.spec.inputs))
        result, unrecorded = outcome(record, future, self.supervisor.launcher.name, self._cancel_reason)
        try:
            if unrecorded:
                self.supervisor.audit.record(result, record.spec.tenant)
        except OSError as err:
            print(f"taichi-sandbox: cannot write the audit record of job {result.job_id}: {err}", file=sys.stderr,
                  flush=True)
        finally:
            self.jobs.finish(record, result, result.exit_status)

    def _follow(self, conn: socket.socket, records: list[JobRecord], output: bool, samples: bool) -> None:
        """Stream each job's output, usage, output files and verdict until every job has one, then
        `end`. When the client goes away first, its jobs still pending are cancelled."""
        wake = threading.Event()
        offsets = {r.spec.job_id: 0 for r in records}
        last_sample = {}
        pending = list(records)
        for record in records:
            record.watchers.add(wake)
        try:
            while not _gone(conn):
                wake.clear()
                for record in list(pending):
                    job_id, result = record.spec.job_id, record.result  # the result first: output precedes it
                    if output:
                        offsets[job_id] = self._send_output(conn, record, offsets[job_id])
                    if samples and record.sample is not None and record.sample is not last_sample.get(job_id):
                        last_sample[job_id] = record.sample
                        self._send(conn, {"type": "sample", "job_id": job_id, "sample": record.sample.model_dump()})
                    if result is not None:
                        self._send_files(conn, record)
                        self._send(conn, {"type": "result", "job_id": job_id, "exit_status": result.exit_status,
                                          "result": result.model_dump(mode="json")})
                        pending.remove(record)
                if not pending:
                    self._send(conn, {"type": "end"})
                    return
                wake.wait(FOLLOW_CHECK)
        finally:
            for record in records:
                record.watchers.discard(wake)
                record.files.close()
            for record in pending:
                if record.future is not None:
                    record.future.cancel()

    def _send_files(self, conn: socket.socket, record: JobRecord) -> None:
        """Each output file as a "file" frame carrying its descriptor, opened one at a time; then
        the job's spool directory is removed."""
        directory, files = record.files.take()
        try:
            for name, size in files:
                fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                try:
                    self._send(conn, {"type": "file", "job_id": record.spec.job_id, "name": name, "size": size},
                               [fd])
                finally:
                    os.close(fd)
        finally:
            if directory is not None:
                shutil.rmtree(directory, ignore_errors=True)

    def _send_output(self, conn: socket.socket, record: JobRecord, offset: int) -> int:
        chunks, offset, dropped = record.output.read(offset)
        if dropped:
            self._send(conn, {"type": "output", "job_id": record.spec.job_id, "stream": "stderr",
                              "data": f"[taichi-sandbox: {dropped} characters of output dropped]\n"})
        for stream, text in chunks:
            self._send(conn, {"type": "output", "job_id": record.spec.job_id, "stream": stream, "data": text})
        return offset

    def _logs(self, conn: socket.socket, record: JobRecord, follow: bool) -> None:
        wake = threading.Event()
        record.watchers.add(wake)
        offset = 0
        try:
            while True:
                wake.clear()
                done = record.result is not None
                offset = self._send_output(conn, record, offset)
                if done or not follow:
                    break
                wake.wait(1.0)
            self._send(conn, {"type": "end", "state": record.state})
        finally:
            record.watchers.discard(wake)

    def _events(self, conn: socket.socket, peer: Peer) -> None:
        sub = self.hub.subscribe(lambda event: event.get("uid") == peer.uid
                                 or may_use(self.policy, peer, event.get("tenant") or ""))
        try:
            while not self._stop.is_set():
                sub.ready.wait(1.0)
                sub.ready.clear()
                if sub.dropped:
                    dropped, sub.dropped = sub.dropped, 0
                    self._send(conn, {"type": "event", "event": {"type": "dropped", "count": dropped}})
                while sub.backlog:
                    self._send(conn, {"type": "event", "event": sub.backlog.popleft()})
        finally:
            self.hub.unsubscribe(sub)

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
        self.executor.shutdown(wait=True, cancel_running=True)
        end = time.monotonic() + 2.0  # followers get their verdicts
        for thread in list(self._threads):
            thread.join(max(0.0, end - time.monotonic()))
        self.supervisor.audit.event({"type": "service", "event": "stopped", "ts": time.time(), "pid": os.getpid()})
        self.supervisor.close()


def check(policy: Policy, path: Path) -> str:
    """What `serve --check` verifies beyond the policy itself. Raises ConfigError."""
    check_names(policy)
    if policy.service.group:
        gid_of(policy.service.group)
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
    return 0
