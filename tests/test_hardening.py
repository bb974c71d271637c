"""Adversarial jobs: each test fails if the protection it names is removed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from sandbox import ConfigError, JobSpec, Limits, Policy, Supervisor, Verdict
from sandbox.core.limits import Settings, Tenant

from .conftest import ROOT, alive as is_alive, assert_no_survivors, kernel

FORK_200 = """
import os, sys, time
for _ in range(200):
    if os.fork() == 0:
        print(f"pid {{os.getpid()}}", flush=True)
        time.sleep(3600)
        os._exit(0)
time.sleep({main_sleep})
"""


def _script(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _pids(result) -> list[int]:
    return [int(p) for p in re.findall(r"pid (\d+)", result.stdout_tail)]


def test_200_children_over_process_limit_all_die(supervisor, tmp_path):
    r = supervisor.run(JobSpec(kernel=_script(tmp_path, "f.py", FORK_200.format(main_sleep=3600)),
                               limits=Limits(max_processes=64, wall_time="60s")))
    assert r.verdict is Verdict.processes, r.reason
    assert_no_survivors(supervisor, r.job_id, _pids(r))


def test_200_children_left_behind_by_a_finished_main_all_die(supervisor, tmp_path):
    r = supervisor.run(JobSpec(kernel=_script(tmp_path, "f.py", FORK_200.format(main_sleep=1)),
                               limits=Limits(wall_time="60s")))
    assert r.verdict is Verdict.ok
    assert len(_pids(r)) == 200 and any("leftover" in n for n in r.notes)
    assert_no_survivors(supervisor, r.job_id, _pids(r))


def test_child_has_only_stdio_and_channel_descriptors(any_supervisor, tmp_path):
    script = _script(tmp_path, "fds.py", "import os\nprint(sorted(int(f) for f in os.listdir('/proc/self/fd')))\n")
    r = any_supervisor.run(JobSpec(kernel=script))
    fds = eval(r.stdout_tail)  # noqa: S307 - our own test job's list of ints
    assert fds[:3] == [0, 1, 2] and len(fds) == 5, fds  # stdio, the channel, and listdir's own fd


def test_fd_exhaustion_stops_at_rlimit_nofile(supervisor, tmp_path):
    script = _script(tmp_path, "fds.py", "import os\nfiles = [open(os.devnull) for _ in range(100000)]\n")
    r = supervisor.run(JobSpec(kernel=script, limits=Limits(max_open_files=64)))
    assert r.verdict is Verdict.error and r.error_type == "OSError" and "Too many open files" in r.error_message


def test_one_gigabyte_of_output_keeps_supervisor_memory_flat(supervisor):
    me = psutil.Process()
    supervisor.run(JobSpec(kernel=kernel("saxpy.py")))
    before = me.memory_info().rss
    r = supervisor.run(JobSpec(kernel=kernel("output_flood.py"), limits=Limits(max_output="1GiB", wall_time="120s")))
    grown = me.memory_info().rss - before
    assert r.verdict is Verdict.output and r.usage.output_bytes > 1 << 30
    assert grown < 64 << 20, f"supervisor RSS grew by {grown / 2**20:.0f} MiB"
    assert len(r.stdout_tail) <= 16 * 1024


def _fork_server_processes() -> set[int]:
    """Fork-servers of this checkout's interpreter and everything forked from them (their command
    line is the server's; other checkouts' test runs use other venvs)."""
    return {p.pid for p in psutil.process_iter(["cmdline"])
            if "sandbox.job.forkserver" in (p.info["cmdline"] or []) and p.info["cmdline"][0] == sys.executable}


def _orphan_check(argv: list[str], tmp_path) -> None:
    """SIGKILL the supervisor while its job tree runs: within a second no job process is left, and
    within two neither the job's directory nor the fork-server's (the server removes both)."""
    temp = tmp_path / "temp"
    temp.mkdir(mode=0o777)
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path), "TMPDIR": str(temp)}
    before = _fork_server_processes()
    sup = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    pids: list[int] = []
    while time.monotonic() < deadline and len(pids) < 11:  # fork-server (detached) + 10 job processes
        time.sleep(0.2)
        pids = sorted(_fork_server_processes() - before)
    assert len(pids) >= 11, "fork-server and the job tree should be running"
    os.kill(sup.pid, signal.SIGKILL)
    sup.wait()
    deadline = time.monotonic() + 1.0
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in pids if is_alive(p)]
    assert alive == [], f"{len(alive)} job processes outlived the supervisor"
    deadline = time.monotonic() + 2.0
    while os.listdir(temp) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(temp) == [], "the job's or the fork-server's directory outlived the supervisor"
    audit = tmp_path / "taichi-sandbox" / "audit.jsonl"
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r["type"] for r in records] == ["started", "aborted"], records  # the fork-server outlived it
    assert records[0]["job_id"] == records[1]["job_id"] and records[1]["by"] == "fork-server"


def test_sigkill_of_cli_kills_every_job_process_within_a_second(tmp_path):
    _orphan_check([sys.executable, "-m", "sandbox", "run", kernel("spawner.py"), "--wall-time", "60s"], tmp_path)


def test_sigkill_of_run_kernel_process_kills_every_job_process_within_a_second(tmp_path):
    code = (f"from sandbox import run_kernel; run_kernel({kernel('spawner.py')!r}, "
            "limits={'wall_time': '60s'})")
    _orphan_check([sys.executable, "-c", code], tmp_path)


def _tenant_supervisor(state_dir) -> Supervisor:
    policy = Policy(tenants={"alice": Tenant(), "bob": Tenant()}, settings=Settings(state_dir=str(state_dir)))
    return Supervisor(policy, audit_log=state_dir / "tenants.jsonl")


def test_offline_cache_is_never_shared_between_tenants(tmp_path):
    with _tenant_supervisor(tmp_path) as sup:
        paths = {t: sup.run(JobSpec(kernel=kernel("tiny.py"), tenant=t)).ti_init[0]["effective"]
                 ["offline_cache_file_path"] for t in ("alice", "bob")}
    assert paths["alice"] != paths["bob"]
    assert all(list((tmp_path / "ticache" / t).glob("*.tic")) for t in paths)


LEAVE_LOCK = """
import os, sys
import taichi as ti
from taichi.lang import impl
ti.init(arch=ti.cpu)
open(os.path.join(impl.current_cfg().offline_cache_file_path, "ticache.lock"), "w").close()
os._exit(0)  # as a killed job would: Taichi never removes its lock
"""


def test_a_cache_lock_a_killed_job_leaves_does_not_stop_the_next_job_caching(tmp_path):
    """Taichi skips writing its cache while `ticache.lock` exists; each job's cache is its own."""
    script = tmp_path / "lock.py"
    script.write_text(LEAVE_LOCK)
    with _tenant_supervisor(tmp_path) as sup:
        sup.run(JobSpec(kernel=str(script), tenant="alice"))
        r = sup.run(JobSpec(kernel=kernel("tiny.py"), tenant="alice"))
    assert r.ok and list((tmp_path / "ticache" / "alice").glob("*.tic")), r.notes


@pytest.mark.parametrize("name", ["../etc", ".hidden", "a/b", "", "ok\n"])
def test_tenant_names_cannot_escape_the_state_dir(name):
    with pytest.raises(ConfigError, match="invalid tenant name"):
        Policy.from_dict({"tenants": {name: {}}}, "limits.toml")


def test_realtime_signal_death_is_a_crash_verdict(supervisor, tmp_path):
    script = _script(tmp_path, "rt.py", "import os\nos.kill(os.getpid(), 40)\n")
    r = supervisor.run(JobSpec(kernel=script))
    assert r.verdict is Verdict.crashed and r.signal == "SIG40"


def test_oversized_job_is_rejected_not_raised(supervisor):
    r = supervisor.run(JobSpec(kernel=kernel("tiny.py"), args=["x" * (5 << 20)]))
    assert r.verdict is Verdict.rejected and "job too large" in r.reason


def test_orphan_grandchildren_of_a_finished_job_are_killed(supervisor, tmp_path):
    # A leaves the session at once (never sampled) and forks B: killing A alone would re-parent B.
    script = _script(tmp_path, "nest.py", """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        print(f"pid {os.getpid()}", flush=True)
        time.sleep(3600)
    print(f"pid {os.getpid()}", flush=True)
    time.sleep(3600)
time.sleep(0.3)
""")
    r = supervisor.run(JobSpec(kernel=script, limits=Limits(poll_interval="1h")))
    assert len(_pids(r)) == 2
    assert_no_survivors(supervisor, r.job_id, _pids(r))
