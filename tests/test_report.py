"""`taichi-sandbox report` for real: audit records written by a real Supervisor and executor (and
the node service, as root) for jobs that pass, fail and break a limit, rotated as logrotate does,
then read by the CLI in a subprocess. Old-format, torn and corrupt records are counted or skipped,
never a traceback."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from sandbox import JobSpec, Supervisor
from sandbox.core.limits import load_policy
from sandbox.node.executor import SandboxExecutor

POLICY = """
[defaults]
memory = "512MiB"
[tenants.alice]
[tenants.bob]
[job_types.train]
[job_types.eval]
[sandbox]
state_dir = "{state}"
"""
OK, FAIL, SLOW = "print('hi')\n", "raise SystemExit(3)\n", "import time\ntime.sleep(30)\n"
UID_A = 59911  # a second real uid for the non-root tests (no passwd entry needed)


def report(log: Path, *args: str, uid: int | None = None, text: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "sandbox", "report", "--audit-log", str(log), *args]
    if uid is not None:
        from .test_service import as_uid
        command = as_uid(uid, *command[1:], gid=uid)
    return subprocess.run(command, capture_output=True, text=text, timeout=120)


def report_json(log: Path, *args: str) -> dict:
    done = report(log, "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def by_name(data: dict) -> dict[str, dict]:
    return {group[data["by"]]: group for group in data["groups"]}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """A log with, for alice: ok (train) and error (eval) run directly; for bob, through an executor:
    ok (train) and a wall-time breach. Returns (log, the policy, the kernels' directory)."""
    root = tmp_path_factory.mktemp("report")
    root.chmod(0o755)
    limits = root / "limits.toml"
    limits.write_text(POLICY.format(state=root / "state"))
    policy = load_policy(limits)
    for name, text in (("ok.py", OK), ("fail.py", FAIL), ("slow.py", SLOW)):
        (root / name).write_text(text)
        (root / name).chmod(0o644)
    log = root / "audit.jsonl"
    with Supervisor(policy, audit_log=log) as sup:
        assert sup.run(JobSpec(kernel=str(root / "ok.py"), tenant="alice", job_type="train")).verdict.value == "ok"
        assert sup.run(JobSpec(kernel=str(root / "fail.py"), tenant="alice", job_type="eval")).verdict.value == "error"
        with SandboxExecutor(supervisor=sup, max_concurrent=1) as executor:
            futures = [executor.submit(JobSpec(kernel=str(root / "ok.py"), tenant="bob", job_type="train"), quiet=True),
                       executor.submit(JobSpec(kernel=str(root / "slow.py"), tenant="bob",
                                               limits={"wall_time": "1s", "grace": "0.2s"}), quiet=True)]
            assert [f.result().verdict.value for f in futures] == ["ok", "wall_time"]
    return log, policy, root


def test_job_records_carry_what_accounting_needs(jobs):
    log, _, _ = jobs
    records = [json.loads(line) for line in log.read_text().splitlines()]
    finals = [r for r in records if r["type"] == "job"]
    assert len(finals) == 4
    for r in finals:
        assert r["uid"] == os.getuid() and r["user"] and r["tenant"] in ("alice", "bob")
        assert 0 < r["started_at"] <= r["ts"] and r["limits"]["memory"] == 512 << 20
    direct, queued = finals[:2], finals[2:]
    assert [r["job_type"] for r in finals] == ["train", "eval", "train", None]
    assert all("submitted_at" not in r and "reserved" not in r for r in direct)  # no queue: no wait, no reservation
    for r in queued:
        assert r["submitted_at"] <= r["started_at"] and r["reserved"] == {"memory": 512 << 20, "gpu_memory": 0, "cpu": 1}
    assert [v["resource"] for v in records if v["type"] == "violation" and v["action"] != "warn"] == ["wall_time"]


def test_report_json_sums_per_tenant_with_totals(jobs):
    log, _, _ = jobs
    data = report_json(log)
    groups, totals = by_name(data), data["totals"]
    assert set(groups) == {"alice", "bob"} and totals["jobs"] == 4 and totals["skipped_lines"] == 0
    bob = groups["bob"]
    assert bob["jobs"] == 2 and bob["violations"] == {"wall_time": 1} and bob["queue_wait"]["jobs"] == 2
    assert bob["wall_seconds"] >= 1.0 and bob["cpu_seconds"] > 0 and bob["unknown"] == {}
    assert 0 <= bob["queue_wait"]["mean_seconds"] <= bob["queue_wait"]["p95_seconds"] < 60
    assert 0 < bob["reserved_memory_gib_hours"] < 0.5 * bob["wall_seconds"] / 3600 * 1.5 + 0.01
    assert bob["gpu_memory_gib_hours"] == 0 and bob["peak_memory_bytes"] > 0
    assert groups["alice"]["queue_wait"] == {"jobs": 0, "mean_seconds": None, "p95_seconds": None}
    assert totals["cpu_seconds"] == pytest.approx(sum(g["cpu_seconds"] for g in data["groups"]))
    assert totals["violations"] == {"wall_time": 1} and totals["unfinished"] == 0


@pytest.mark.parametrize("key, expected", [("user", None), ("verdict", {"ok": 2, "error": 1, "wall_time": 1}),
                                           ("job_type", {"train": 2, "eval": 1, "-": 1})])
def test_report_by_each_key_and_csv_parses_back(jobs, key, expected):
    log, _, _ = jobs
    data = report_json(log, "--by", key)
    counts = {name: group["jobs"] for name, group in by_name(data).items()}
    assert counts == (expected or {data["groups"][0]["user"]: 4})
    done = report(log, "--csv", "--by", key, text=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(b"\r\n")  # RFC 4180 line ends
    rows = list(csv.DictReader(io.StringIO(done.stdout.decode(), newline="")))
    assert {row[key]: int(row["jobs"]) for row in rows} == counts and "queue_wait_p95_seconds" in rows[0]
    if key == "verdict":
        breach = [row for row in rows if row["verdict"] == "wall_time"][0]
        assert breach["violations"] == breach["violations_wall_time"] == "1"
        assert [row["queue_wait_mean_seconds"] for row in rows if row["verdict"] == "error"] == [""]  # unknown


def test_the_table_is_the_default_and_the_log_the_policys(jobs, tmp_path):
    log, _, root = jobs
    done = report(log, "--by", "verdict")
    assert done.returncode == 0 and done.stderr == ""
    assert "wall_time" in done.stdout and "total" in done.stdout and "violations by resource" in done.stdout
    limits = tmp_path / "limits.toml"
    limits.write_text(f'[sandbox]\naudit_log = "{log}"\n')
    command = [sys.executable, "-m", "sandbox", "report", "--limits-file", str(limits), "--csv"]
    policy = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert policy.returncode == 0 and policy.stdout == report(log, "--csv").stdout


def test_since_and_until_select_jobs_by_their_end(jobs):
    log, _, _ = jobs
    ends = sorted(json.loads(line)["ts"] for line in log.read_text().splitlines() if '"type":"job"' in line)
    middle = datetime.fromtimestamp((ends[1] + ends[2]) / 2).isoformat()
    assert report_json(log, "--since", middle)["totals"]["jobs"] == 2
    assert report_json(log, "--until", middle)["totals"]["jobs"] == 2
    assert report_json(log, "--since", "1h")["totals"]["jobs"] == 4
    assert report_json(log, "--until", "1h")["totals"]["jobs"] == 0
    assert report_json(log, "--since", "2026-01-01", "--until", "2099-01-01T00:00")["totals"]["jobs"] == 4


@pytest.mark.parametrize("args, message", [
    (["--since", "yesterday"], "--since 'yesterday': expected a duration ago"),
    (["--until", "7"], "--until '7': expected a duration ago"),
    (["--by", "kernel"], "--by 'kernel': expected one of tenant, user, verdict, job_type"),
    (["--json", "--csv"], "--json and --csv: choose one"),
    (["--since", "1h", "--until", "2h"], "--since must be before --until"),
    (["--since", "2026-13-01"], "--since '2026-13-01': expected"),
])
def test_bad_input_is_one_line_and_exit_2(jobs, args, message):
    log, _, _ = jobs
    done = report(log, *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"taichi-sandbox: error: {message}") and done.stderr.count("\n") == 1


def test_a_missing_log_is_one_line_and_exit_1(tmp_path):
    done = report(tmp_path / "nothing.jsonl")
    assert done.returncode == 1
    assert done.stderr == f"taichi-sandbox: error: no audit log at {tmp_path / 'nothing.jsonl'} (nor rotated files " \
                          "beside it)\n"


def test_rotated_plain_and_gzip_files_are_read_and_joined_across_rotation(jobs, tmp_path):
    """logrotate with `compress` and `delaycompress`: audit.jsonl.2.gz, audit.jsonl.1, audit.jsonl;
    a job's started record left in the rotated file joins its final record in the live one."""
    log, _, _ = jobs
    lines = log.read_text().splitlines(keepends=True)
    started = [line for line in lines if '"type":"started"' in line]
    finals = [line for line in lines if '"type":"job"' in line]
    rotated = tmp_path / "audit.jsonl"
    with gzip.open(tmp_path / "audit.jsonl.2.gz", "wt") as f:
        f.writelines(lines)
    (tmp_path / "audit.jsonl.1").write_text(started[0].replace('"job_id":"', '"job_id":"x'))
    # ... the job's final record in the live log: an old-format fork-server `aborted` one, without a tenant
    job_id = json.loads(started[0])["job_id"]
    rotated.write_text(json.dumps({"type": "aborted", "job_id": "x" + job_id, "ts": time.time(), "by": "fork-server",
                                   "reason": "its supervisor died"}) + "\n")
    (tmp_path / "audit.jsonl.1.bak").write_text("".join(finals))  # not a rotated name: not read
    data = report_json(rotated, "--by", "verdict")
    assert data["files"] == [str(tmp_path / n) for n in ("audit.jsonl.2.gz", "audit.jsonl.1", "audit.jsonl")]
    assert by_name(data)["aborted"]["jobs"] == 1 and data["totals"]["jobs"] == 5 and data["totals"]["unfinished"] == 0
    tenants = by_name(report_json(rotated))
    assert tenants["alice"]["jobs"] == 3  # the aborted job's tenant came from its started record


def test_torn_corrupt_and_old_format_lines_are_skipped_or_counted_as_unknown(jobs, tmp_path):
    log, _, _ = jobs
    lines = log.read_text().splitlines(keepends=True)
    final = next(line for line in lines if '"type":"job"' in line)
    old = {"type": "job", "job_id": "old1", "tenant": "carol", "ts": time.time(), "kernel": "k.py", "arch": "cpu",
           "verdict": "memory", "reason": "", "exit_code": None, "signal": "SIGKILL",
           "usage": {"cpu_seconds": 2.0, "wall_seconds": 4.0, "peak_rss": 100, "peak_memory": None}, "labels": {}}
    text = "".join([
        *lines,
        final[:40],  # a torn write, the next record glued onto it (it still counts)
        final.replace('"job_id":"', '"job_id":"glued'),
        "not json at all\n", "[1, 2]\n", '{"no": "type"}\n',
        json.dumps({**old, "job_id": "bad", "usage": {"cpu_seconds": "lots"}}) + "\n",  # wrong types
        json.dumps({"type": "violation", "job_id": "old1", "tenant": "carol", "ts": 1.0, "resource": "memory",
                    "action": "kill"}) + "\n",
        json.dumps({"type": "violation", "job_id": "old1", "tenant": "carol", "ts": 1.0, "resource": "cpu_time",
                    "action": "warn"}) + "\n",
        json.dumps(old) + "\n",
        json.dumps({**old, "job_id": "rej", "verdict": "rejected", "started_at": old["ts"], "job_type": None,
                    "usage": {"cpu_seconds": 0.0, "wall_seconds": 0.0, "peak_rss": 0, "peak_memory": None},
                    "limits": {"memory": None, "gpu_memory": None}}) + "\n",  # it held nothing: not unknown
        json.dumps({"type": "refused", "ts": time.time(), "tenant": "carol", "uid": 5, "reason": "quota"}) + "\n",
        json.dumps({"type": "started", "job_id": "still-running", "tenant": "carol", "ts": time.time()}) + "\n",
        '{"type":"job","job_id":"half',  # the last line, torn
    ])
    path = tmp_path / "audit.jsonl"
    path.write_text(text)
    done = report(path, "--json")
    assert done.returncode == 0
    assert done.stderr == "taichi-sandbox: warning: 6 unreadable audit lines skipped\n"
    data = json.loads(done.stdout)
    carol = by_name(data)["carol"]
    assert carol["jobs"] == 2 and carol["refused"] == 1 and carol["violations"] == {"memory": 1}
    assert carol["cpu_seconds"] == 2.0 and carol["peak_memory_bytes"] == 100
    assert carol["reserved_memory_gib_hours"] == 0 and carol["queue_wait"]["jobs"] == 0  # the old one: unknown
    assert carol["unknown"] == {"gpu_memory_gib_hours": 1, "reserved_memory_gib_hours": 1}
    assert data["totals"]["jobs"] == 7 and data["totals"]["unfinished"] == 1 and data["totals"]["skipped_lines"] == 6
    assert by_name(report_json(path, "--by", "user"))["unknown"]["jobs"] == 2  # carol's records have no uid
    table = report(path)
    assert table.returncode == 0 and "0.0*" in table.stdout and "older records" in table.stdout


def test_a_truncated_gzip_file_is_reported_and_the_rest_read(jobs, tmp_path):
    log, _, _ = jobs
    whole = gzip.compress(log.read_bytes() * 50)
    (tmp_path / "audit.jsonl.2.gz").write_bytes(whole[: len(whole) // 2])
    shutil.copy(log, tmp_path / "audit.jsonl")
    done = report(tmp_path / "audit.jsonl", "--json")
    assert done.returncode == 0
    assert done.stderr.startswith(f"taichi-sandbox: warning: {tmp_path / 'audit.jsonl.2.gz'}: unreadable from some")
    assert json.loads(done.stdout)["totals"]["jobs"] >= 4


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the report as a second, real uid")
def test_a_user_sees_only_their_own_records_and_root_logs_are_refused_in_one_line(jobs, tmp_path):
    log, _, _ = jobs
    home = tmp_path / "logs"
    home.mkdir(mode=0o755)
    lines = log.read_text().splitlines(keepends=True)
    mine = [line.replace(f'"uid":{os.getuid()},', f'"uid":{UID_A},') for line in lines[: len(lines) // 2]]
    shared = home / "audit.jsonl"
    shared.write_text("".join(mine + lines[len(lines) // 2:]))
    shared.chmod(0o600)
    done = report(shared, "--json", uid=UID_A)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"taichi-sandbox: error: cannot read the audit log {shared}: permission denied (it is " \
                          "root's: run the report as root, or ask the node's operator)\n"
    home.chmod(0o700)  # ... or its directory is root's
    hidden = report(shared, "--json", uid=UID_A)
    assert hidden.returncode == 1 and "permission denied (it is root's" in hidden.stderr
    assert hidden.stderr.count("\n") == 1
    home.chmod(0o755)
    shared.chmod(0o644)  # an operator made it readable: the user still sees only their own jobs
    seen = report(shared, "--json", "--by", "user", uid=UID_A)
    assert seen.returncode == 0, seen.stderr
    data = json.loads(seen.stdout)
    expected = sum(1 for line in mine if '"type":"job"' in line)
    assert [g["user"] for g in data["groups"]] == [[json.loads(m) for m in mine if '"type":"job"' in m][0]["user"]]
    assert data["totals"]["jobs"] == expected >= 1
    assert report_json(shared)["totals"]["jobs"] == 4  # root sees every record


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the node service and its clients as other uids")
def test_a_service_job_is_accounted_to_its_client_with_its_queue_wait_and_reservation(tmp_path):
    from .test_service import ALICE, Node, client_dir
    node = Node(tmp_path / "node")
    try:
        home = client_dir(tmp_path, ALICE, **{"t.py": OK})
        assert node.cli(ALICE, "run", "t.py", cwd=home).returncode == 0
        assert node.cli(ALICE, "run", "t.py", "--tenant", "bob", cwd=home).returncode == 2  # refused: not bob's
    finally:
        assert node.stop() == 0
    data = report_json(node.audit, "--by", "user")
    alice = by_name(data)[str(ALICE)]  # no passwd entry: the uid
    assert alice["jobs"] == 1 and alice["queue_wait"]["jobs"] == 1 and alice["unknown"] == {}
    assert alice["reserved_memory_gib_hours"] > 0 and alice["gpu_memory_gib_hours"] == 0
    assert data["totals"]["jobs"] == 1 and data["totals"]["unfinished"] == 0


def test_files_scanned_in_parallel_give_what_one_process_gives(tmp_path, monkeypatch):
    """The benchmark's generated year: 12 rotated files, jobs' records across their borders."""
    import importlib.util

    from sandbox.node import auditscan
    spec = importlib.util.spec_from_file_location("bench_accounting", Path(__file__).parent.parent / "benchmarks" /
                                                  "accounting.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    log = bench.generate(tmp_path, 6000)
    parallel = auditscan.account(log, "tenant")
    monkeypatch.setattr(auditscan.os, "sched_getaffinity", lambda pid: {0})
    alone = auditscan.account(log, "tenant")
    assert len(parallel.files) == 12 and parallel.totals().jobs > 1900
    assert {k: g.as_dict() for k, g in parallel.groups.items()} == {k: g.as_dict() for k, g in alone.groups.items()}
    assert (parallel.unfinished, parallel.skipped_lines) == (alone.unfinished, alone.skipped_lines)
    assert parallel.unfinished <= 1 and parallel.skipped_lines == 0  # at most the job the log ends in
    week = auditscan.account(log, "tenant", since=time.time() - 7 * 86400)
    assert week.files == [str(log)] and 0 < week.totals().jobs < parallel.totals().jobs / 12
