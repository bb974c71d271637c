"""What reaches the job and what is left behind: Taichi settings, environment, files, audit, orphans."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sandbox import JobSpec, Limits, Supervisor, Verdict

from .conftest import alive, kernel, make_policy, run


def test_ti_init_escape_attempts_keep_supervisor_settings(any_supervisor):
    r = run(any_supervisor, "escape_init.py", gpu_memory="1GiB", cpu_threads=1)
    assert r.verdict is Verdict.ok, r.reason
    (init,) = r.ti_init
    eff = init["effective"]
    assert eff["arch"] in ("x64", "arm64")
    assert eff["cpu_max_num_threads"] == 1
    assert eff["device_memory_GB"] == 1.0 and eff["device_memory_fraction"] == 0.0
    assert eff["offline_cache_file_path"] != "/tmp/mine"
    assert {"arch", "device_memory_GB", "cpu_max_num_threads", "offline_cache_file_path",
            "env TI_ARCH", "env TI_DEVICE_MEMORY_GB"} <= set(init["clamped"])
    assert "sum 12.0" in r.stdout_tail


def test_secret_environment_never_reaches_the_job(supervisor, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("TI_ARCH", "cuda")
    script = tmp_path / "env.py"
    script.write_text("import os, json\nprint(json.dumps(dict(os.environ)))\n")
    r = supervisor.run(JobSpec(kernel=str(script), env={"MY_SETTING": "1"}))
    env = json.loads(r.stdout_tail)
    assert "AWS_SECRET_ACCESS_KEY" not in env and "hunter2" not in r.stdout_tail
    assert "TI_ARCH" not in env
    assert env["MY_SETTING"] == "1" and env["TI_SKIP_VERSION_CHECK"] == "ON"
    assert env["HOME"] != os.environ["HOME"] and env["TMPDIR"].startswith(str(Path(env["HOME"]).parent))


def test_private_directories_are_removed_whatever_the_verdict(supervisor, tmp_path):
    script = tmp_path / "dirs.py"
    script.write_text("import os, tempfile\nprint(os.getcwd(), os.environ['HOME'], tempfile.gettempdir())\n"
                      "open('out.txt', 'w').write('x')\nraise SystemExit(2)\n")
    r = supervisor.run(JobSpec(kernel=str(script)))
    assert r.verdict is Verdict.error and r.exit_code == 2
    for path in r.stdout_tail.split():
        assert not Path(path).exists()


def test_file_size_limit_stops_disk_filler(supervisor, tmp_path):
    script = tmp_path / "fill.py"
    script.write_text("with open('big', 'wb') as f:\n    for _ in range(100):\n        f.write(b'0' * (1 << 20))\n")
    r = supervisor.run(JobSpec(kernel=str(script), limits=Limits(max_file_size="5MiB")))
    assert r.verdict is Verdict.error and "File too large" in r.error_message


def test_audit_log_has_job_and_violation_records(state_dir):
    audit = state_dir / "audit-own.jsonl"
    with Supervisor(make_policy(state_dir), audit_log=audit) as sup:
        r = run(sup, "sleeper.py", wall_time="1s")
        ok = run(sup, "saxpy.py")
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    jobs = [x for x in lines if x["type"] == "job"]
    assert [(j["job_id"], j["verdict"]) for j in jobs] == [(r.job_id, "wall_time"), (ok.job_id, "ok")]
    violations = [x for x in lines if x["type"] == "violation" and x["action"] != "warn"]
    assert len(violations) == 1 and violations[0]["resource"] == "wall_time"
    assert violations[0]["action"] == "sigterm" and violations[0]["job_id"] == r.job_id


def test_offline_cache_is_per_tenant_and_persists(state_dir):
    with Supervisor(make_policy(state_dir), audit_log=state_dir / "a.jsonl") as sup:
        r = sup.run(JobSpec(kernel=kernel("saxpy.py"), tenant=None))
    job_cache = Path(r.ti_init[0]["effective"]["offline_cache_file_path"])
    cache = state_dir / "ticache" / "_default"
    assert job_cache.name == "cache" and not job_cache.exists(), "the job's own cache goes with its work dir"
    assert list(cache.glob("*.tic")), "ti.reset() should have written compiled kernels, kept by the supervisor"
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".tic")) == ["ticache.tcb"]


FAST_ORPHAN = """
import os, sys, time
if os.fork() == 0:
    if os.fork() == 0:
        os.setsid()
        print(f"pid {os.getpid()}", flush=True)
        while True:
            time.sleep(1)
    os._exit(0)
time.sleep(0.3)
"""


def test_orphan_that_left_before_any_sample_is_still_killed(any_supervisor, tmp_path):
    script = tmp_path / "fast_orphan.py"
    script.write_text(FAST_ORPHAN)
    r = any_supervisor.run(JobSpec(kernel=str(script), limits=Limits(poll_interval="10s")))
    (pid,) = [int(p) for p in r.stdout_tail.split()[1::2]]
    assert r.verdict is Verdict.ok
    if any_supervisor.namespaces_unavailable() is None:  # its PID namespace's init killed it: `pid` is not a host pid
        assert any("killed 1 leftover" in n for n in r.notes), r.notes
        return
    assert any("leftover" in n and str(pid) in n for n in r.notes), r.notes
    assert not alive(pid)
