"""The node service's restart reconciliation, on audit logs written here."""

from __future__ import annotations

import json

import pytest

from sandbox.core.audit import AuditLog
from sandbox.node import reconcile


def _log(path, *records) -> AuditLog:
    log = AuditLog(path)
    log.append(list(records))
    return log


def test_a_restart_aborts_only_service_jobs_left_unfinished_since_the_previous_start(tmp_path, monkeypatch):
    service = {"uid": 1000, "user": "alice", "host": "h", "client_pid": 42}
    log = _log(tmp_path / "audit.jsonl",
               {"type": "started", "job_id": "before", **service},  # the previous start's business
               {"type": "service", "event": "started", "pid": 1},
               {"type": "started", "job_id": "ended", **service},
               {"type": "job", "job_id": "ended", "verdict": "ok"},
               {"type": "started", "job_id": "forked", **service},
               {"type": "aborted", "job_id": "forked", "by": "fork-server"},
               {"type": "started", "job_id": "local", "pid": 7},  # a local supervisor's, sharing the log
               {"type": "started", "job_id": "lost", **service})
    monkeypatch.setattr(reconcile, "TAIL_CHUNK", 64)  # the previous start lies several chunks back
    assert [r["job_id"] for r in reconcile.reconcile(log)] == ["lost"]
    records = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert records[-2]["type"] == "aborted" and records[-2]["uid"] == 1000
    assert records[-1]["type"] == "service" and records[-1]["event"] == "started"
    assert reconcile.reconcile(log) == []  # reconciled once


def test_the_first_start_reads_the_whole_log(tmp_path):
    log = _log(tmp_path / "audit.jsonl", {"type": "started", "job_id": "lost", "client_pid": 1})
    assert [r["job_id"] for r in reconcile.reconcile(log)] == ["lost"]
    assert reconcile.reconcile(AuditLog(tmp_path / "none.jsonl")) == []


def test_the_guard_bounds_what_one_uids_queued_jobs_hold():
    from sandbox.core.limits import Service
    from sandbox.node.executor import QueueFull
    from sandbox.node.guard import Guard
    guard = Guard(Service(max_input_files_per_uid=64, max_held_bytes_per_uid="1MiB"))
    guard.hold(1000, 64, 1 << 20)
    with pytest.raises(QueueFull, match="uid 1000 holds 64 input files"):
        guard.hold(1000, 1, 0)
    with pytest.raises(QueueFull, match="hold 1048576 bytes in the service, and this request has 1"):
        guard.hold(1000, 0, 1)
    guard.hold(2000, 64, 1)  # another uid's share is its own
    guard.hold(1000, -64, -(1 << 20))
    guard.hold(1000, 64, 1)


def test_a_return_value_is_counted_against_its_uid_until_its_follower_has_it():
    from sandbox.core.limits import Service
    from sandbox.node.auth import Peer
    from sandbox.node.guard import Guard
    from sandbox.node.jobs import JobRecord
    from sandbox import JobResult, JobSpec, Verdict
    guard = Guard(Service(max_held_bytes_per_uid="1MiB"))
    peer = Peer(pid=1, uid=1000, gid=1000, user="alice", groups=frozenset({1000}))
    first, second, unfollowed = (JobRecord(JobSpec(kernel="k.py:f"), peer, None, followed=f, guard=guard)
                                 for f in (True, True, False))
    assert first.hold_result(700 << 10) is None and unfollowed.hold_result(700 << 10) is None  # nobody fetches it
    bound, why = second.hold_result(700 << 10)
    assert bound == 1 << 20 and "this result has 716800" in why and "read results as they come" in why
    first.result = JobResult(job_id=first.spec.job_id, kernel="k.py:f", arch="cpu", verdict=Verdict.ok)
    first.unfollow()  # its follower has it
    first.ended()  # may follow: given back once
    assert second.hold_result(1 << 20) is None


def test_a_finished_job_keeps_its_arguments_and_return_value_only_while_its_follower_needs_them():
    from sandbox import JobResult, JobSpec, Verdict
    from sandbox.node.auth import Peer
    from sandbox.node.jobs import JobRecord
    peer = Peer(pid=1, uid=1000, gid=1000, user="alice", groups=frozenset({1000}))
    for followed in (False, True):
        record = JobRecord(JobSpec(kernel="k.py:f", args=["A" * 1000]), peer, b"source", followed=followed)
        record.result = JobResult(job_id=record.spec.job_id, kernel="k.py:f", arch="cpu", verdict=Verdict.ok,
                                  started_at=0, ended_at=1, return_value=list(range(1000)))
        record.ended()
        assert (record.spec.args == [] and record.source is None) is not followed
        assert (record.result.return_value is None) is not followed
        record.unfollow()  # the follower has sent it
        assert record.spec.args == [] and record.result.return_value is None and record.source is None


def test_a_result_frame_written_in_pieces_reads_as_the_whole_result():
    import json
    import math
    import socket
    import threading

    import numpy as np

    from sandbox import JobResult, Verdict
    from sandbox.node import frames
    from sandbox.node.streams import CHUNK, Stream
    value = {"a": (np.arange(7, dtype=np.int16), np.float32(2.5)), 3: [math.nan, np.zeros((2, 0))],
             "strided": np.ones((5, 3))[:, 1], "big": np.arange(CHUNK // 4 + 5, dtype=np.int32), "s": 'é"\\'}
    result = JobResult(job_id="j", kernel="k", arch="cpu", verdict=Verdict.ok, return_value=value)
    mine, theirs = socket.socketpair()
    writer = threading.Thread(target=Stream(mine, 10).result, args=("j", result))
    writer.start()
    frame = frames.recv(theirs, within=10)
    writer.join()
    got = JobResult.model_validate_json(json.dumps(frame["result"])).return_value
    assert (frame["type"], frame["exit_status"]) == ("result", 0)
    assert repr(got) == repr(JobResult.model_validate_json(result.model_dump_json()).return_value)
