"""The cgroup mechanism itself: discovery, limits as the kernel reads them back, removal, CPU
bandwidth, `cgroups = "required"`, the read-only fallback, and parsing of files captured from real
v2 kernels (tests/data/cgroup/README.md says where each came from)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox import ConfigError, JobSpec, Limits, Supervisor, Verdict
from sandbox.job.cgroup import CgroupHost, CgroupLimits, CgroupStats, task_limit
from sandbox.job.cgroup.host import (Mount, _within, discover, parse_mountinfo, parse_proc_cgroup,
                                 select_hierarchy)
from sandbox.job.cgroup.v2 import prepare_parent, stats_from
from sandbox.watch.monitor import kernel_breaches

from .conftest import ROOT, kernel, kernel_enforces, make_policy, second_v2_hierarchy

CAPTURES = Path(__file__).parent / "data" / "cgroup"
MiB = 1 << 20

SHOW_OWN_CGROUP = """
import json, os, threading, time
threading.Thread(target=time.sleep, args=(1,), daemon=True).start()  # every thread is in the job cgroup
threads = {open(f"/proc/self/task/{tid}/cgroup").read() for tid in os.listdir("/proc/self/task")}
assert len(os.listdir("/proc/self/task")) == 2 and len(threads) == 1, threads
own = dict(line.split(":", 2)[1:] for line in open("/proc/self/cgroup").read().splitlines())
def read(controller, name):
    return open(f"/sys/fs/cgroup/{controller}{own[controller]}/{name}").read().strip()
print(json.dumps({"paths": own, "memory": read("memory", "memory.limit_in_bytes"),
                  "memsw": read("memory", "memory.memsw.limit_in_bytes"), "pids": read("pids", "pids.max"),
                  "quota": read("cpu", "cpu.cfs_quota_us"), "procs": read("pids", "cgroup.procs").split()}))
"""

BUSY_PROCESSES = """
import os, time
for _ in range(2):
    if os.fork() == 0:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            pass
        os._exit(0)
os.wait(); os.wait()
"""


def v1_only(sup: Supervisor) -> None:
    if sup.cgroups.version != 1:
        pytest.skip(f"needs writable cgroup v1 hierarchies: {sup.cgroups.reason or 'this host runs v2'}")


def write_job(tmp_path: Path, text: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(text)
    return str(path)


# --- files captured from real kernels ---------------------------------------------------------------

def test_v2_stats_from_files_captured_from_a_real_v2_kernel():
    stats = stats_from(str(CAPTURES / "v2-fedora-session-scope"), frozenset({"memory", "pids", "cpu"}))
    assert stats == CgroupStats(memory=10498404352, memory_peak=18772946944, cpu_seconds=3611.347518,
                                oom_kills=0, pids_refused=0)
    assert kernel_breaches(stats, CgroupLimits(memory=1 << 30, tasks=100)) == []


def test_v2_cpu_stat_without_the_cpu_controller_captured_from_a_real_kernel():
    stats = stats_from(str(CAPTURES / "v2-ubuntu1804-service"), frozenset())
    assert stats.cpu_seconds == pytest.approx(0.184713) and stats.memory is None and stats.oom_kills == 0


def test_v2_oom_kill_and_refused_forks_in_a_real_v2_capture_with_the_counters_changed(tmp_path):
    scope = tmp_path / "scope"
    shutil.copytree(CAPTURES / "v2-fedora-session-scope", scope)
    events = (scope / "memory.events").read_text().replace("oom_kill 0", "oom_kill 1")
    (scope / "memory.events").write_text(events)
    (scope / "pids.events").write_text("max 3\n")
    stats = stats_from(str(scope), frozenset({"memory", "pids"}))
    assert (stats.oom_kills, stats.pids_refused) == (1, 3)
    assert kernel_breaches(stats, CgroupLimits(memory=1 << 30, tasks=100)) == [
        ("memory", float(1 << 30), 18772946944.0), ("processes", 100.0, 100.0)]


def test_hierarchy_chosen_from_mountinfo_captured_on_real_hosts():
    pure = parse_mountinfo((CAPTURES / "mountinfo-v2-pure.txt").read_text())
    assert select_hierarchy(pure) == (2, [Mount("/sys/fs/cgroup", "/", "cgroup2",
                                                frozenset({"rw", "seclabel", "nsdelegate", "memory_recursiveprot"}))])
    for hybrid in ("mountinfo-hybrid-ubuntu1804.txt", "mountinfo-hybrid-this-machine.txt"):
        version, mounts = select_hierarchy(parse_mountinfo((CAPTURES / hybrid).read_text()))
        assert version == 1 and {"memory", "pids", "cpuacct", "freezer"} <= set().union(*(m.options for m in mounts))


def test_own_cgroup_directories_from_proc_cgroup_captured_on_real_hosts():
    own = parse_proc_cgroup((CAPTURES / "proc-cgroup-hybrid-ubuntu1804.txt").read_text())
    mounts = parse_mountinfo((CAPTURES / "mountinfo-hybrid-ubuntu1804.txt").read_text())
    cpu = next(m for m in mounts if "cpuacct" in m.options)
    assert own["cpu"] == own["cpuacct"] == own[""] == "/system.slice/networkd-dispatcher.service"
    assert _within(cpu, own["cpuacct"]) == "/sys/fs/cgroup/cpu,cpuacct/system.slice/networkd-dispatcher.service"
    assert _within(Mount("/mnt", "/system.slice", "cgroup", frozenset()), own["memory"]) == \
        "/mnt/networkd-dispatcher.service"
    outside = parse_proc_cgroup((CAPTURES / "proc-cgroup-v2-outside-namespace.txt").read_text())
    assert _within(parse_mountinfo((CAPTURES / "mountinfo-v2-pure.txt").read_text())[0], outside[""]) is None


# --- the real v1 hierarchies of this machine --------------------------------------------------------

def test_job_joins_its_v1_cgroup_whose_limits_read_back_and_which_is_removed(supervisor, tmp_path):
    v1_only(supervisor)
    r = supervisor.run(JobSpec(kernel=write_job(tmp_path, SHOW_OWN_CGROUP),
                               limits=Limits(memory="256MiB", max_processes=10, cpu_threads=1, cpu_time="10s")))
    assert r.verdict is Verdict.ok, r.reason
    seen = json.loads(r.stdout_tail)
    assert int(seen["memory"]) == int(seen["memsw"]) == 256 * MiB  # no swap on top
    # pids.max leaves the job exactly its max_processes (and thread room) beside the sandbox's own
    # processes in its cgroup: the init, and the relay unless the fork-server relays
    helpers = len(seen["procs"]) - 1
    assert int(seen["pids"]) == task_limit(10 + helpers, 1) and int(seen["quota"]) == 100_000  # one core
    assert helpers == supervisor.launcher.helpers(supervisor.namespaces_unavailable() is None)
    name = Path(next(n for n in r.notes if n.startswith("cgroup v1: ")).split(": ", 1)[1]).name
    assert name.startswith(f"job-{r.job_id}-")
    for controller in ("memory", "pids", "cpuacct", "freezer"):
        job_dir = Path(supervisor.cgroups.parents[controller]) / name
        if supervisor.namespaces_unavailable() is None:
            assert seen["paths"][controller] == "/"  # in its cgroup namespace its own cgroup is the root
        else:
            assert Path(seen["paths"][controller]).name == name
        assert not job_dir.exists(), f"{job_dir} left behind"
    assert r.enforcement["memory"].level == "hard" and r.enforcement["memory"].by.startswith("cgroup v1")
    assert r.enforcement["processes"].level == "hard" and r.enforcement["cpu_time"].by.startswith("cgroup v1")


def test_cpu_threads_caps_the_jobs_cpu_bandwidth(supervisor, tmp_path):
    if not kernel_enforces(supervisor, "cpu_threads") or (os.cpu_count() or 1) < 2:
        pytest.skip("needs a cgroup cpu controller and two cores")
    r = supervisor.run(JobSpec(kernel=write_job(tmp_path, BUSY_PROCESSES), limits=Limits(cpu_threads=1)))
    assert r.verdict is Verdict.ok, r.reason
    # Two processes busy for 1.5 s of wall time each, on one core's worth of bandwidth.
    assert r.usage.cpu_seconds < 1.1 * r.usage.wall_seconds, r.usage


def test_job_ids_cannot_steer_paths():
    for bad in ("../../escape", "a/b", "", ".hidden", "x" * 65, "new\nline"):
        with pytest.raises(ConfigError, match="job_id") as err:
            JobSpec(kernel="k.py", job_id=bad)
        assert "\n" not in str(err.value)


# --- required, and the fallback with the reason -----------------------------------------------------

def test_required_rejects_jobs_with_the_host_facts_of_an_unprivileged_user(state_dir):
    why = "no writable cgroup: not root and no delegation (uid 1000)"
    with Supervisor(make_policy(state_dir, cgroups="required"), cgroups=CgroupHost(reason=why),
                    audit_log=state_dir / "audit-required.jsonl") as sup:
        r = sup.run(JobSpec(kernel=kernel("tiny.py")))
    assert r.verdict is Verdict.rejected and why in r.reason and "required" in r.reason


def test_required_rejects_a_limit_the_v2_hierarchy_here_cannot_enforce(state_dir):
    host, why = second_v2_hierarchy()
    if host is None:
        pytest.skip(why)
    with Supervisor(make_policy(state_dir, cgroups="required"), cgroups=host,
                    audit_log=state_dir / "audit-required-v2.jsonl") as sup:
        cpu_only = sup.run(JobSpec(kernel=kernel("tiny.py"), limits=Limits(cpu_time="10s")))
        with_memory = sup.run(JobSpec(kernel=kernel("tiny.py"), limits=Limits(memory="1GiB")))
    assert cpu_only.verdict is Verdict.ok, cpu_only.reason
    assert cpu_only.enforcement["cpu_time"].by.startswith("cgroup v2")
    assert with_memory.verdict is Verdict.rejected and "cgroup v2 cannot enforce memory" in with_memory.reason


READ_ONLY_CGROUPFS = 'for d in /sys/fs/cgroup/*/; do mount -o remount,bind,ro "$d"; done; exec "$@"'


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)")
@pytest.mark.parametrize("setting", ["auto", "required"])
def test_read_only_cgroupfs_falls_back_to_polling_or_rejects_with_the_reason(tmp_path, setting):
    limits = tmp_path / "limits.toml"
    limits.write_text(f'[sandbox]\ncgroups = "{setting}"\nstate_dir = "{tmp_path}"\n')
    p = subprocess.run(["unshare", "-m", "sh", "-c", READ_ONLY_CGROUPFS, "sh", sys.executable, "-m", "sandbox",
                        "run", kernel("tiny.py"), "--memory", "1GiB", "--limits-file", str(limits), "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    r = json.loads(p.stdout)
    if setting == "required":
        assert p.returncode == 117 and r["verdict"] == "rejected"
        assert "mounted read-only" in r["reason"], r["reason"]
    else:
        assert p.returncode == 0 and r["verdict"] == "ok"
        memory = r["enforcement"]["memory"]
        assert memory["level"] == "watched" and memory["by"].startswith("polling")
        assert "mounted read-only" in memory["note"] and "outside RSS" in memory["note"]


def test_off_reports_polling_and_why(state_dir):
    with Supervisor(make_policy(state_dir, cgroups="off"), audit_log=state_dir / "audit-off.jsonl") as sup:
        r = sup.run(JobSpec(kernel=kernel("tiny.py"), limits=Limits(memory="1GiB", max_processes=8, cpu_time="9s")))
    assert r.verdict is Verdict.ok
    for limit in ("memory", "processes", "cpu_time"):
        e = r.enforcement[limit]
        assert e.level == "watched" and e.by.startswith("polling") and 'cgroups = "off"' in e.note
    assert r.usage.peak_memory is None and all(s.memory is None for s in r.timeline)


def test_discovery_reports_dmem_and_the_kill_method():
    host = discover()
    if host.version is None:
        pytest.skip(host.reason)
    assert host.kill_method() in ("cgroup.kill", "cgroup.freeze, then SIGKILL", "freezer, then SIGKILL",
                                  "SIGKILL until the cgroup is empty")
    assert isinstance(host.dmem, bool)


@pytest.fixture
def v2_cgroup_holding_a_process():
    """A real v2 cgroup (beside v1 on a hybrid host) with a process in it and a controller it may
    enable for its children (hugetlb: the only one this machine has on v2), removed afterwards."""
    host, why = second_v2_hierarchy()
    if host is None:
        pytest.skip(why)
    root = str(Path(host.root).parent)
    if "hugetlb" not in (Path(root) / "cgroup.controllers").read_text().split():
        pytest.skip("no controller to enable on this v2 hierarchy")
    enabled_before = "hugetlb" in (Path(root) / "cgroup.subtree_control").read_text().split()
    (Path(root) / "cgroup.subtree_control").write_text("+hugetlb")
    own = Path(root) / f"tsbx-test-own-{os.getpid()}"
    own.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (own / "cgroup.procs").write_text(str(sleeper.pid))
        yield own, sleeper.pid
    finally:
        sleeper.kill()
        sleeper.wait()
        for leaf in ("taichi-sandbox", "tsbx-supervisor", ""):
            if (own / leaf).exists():
                (own / leaf).rmdir()
        if not enabled_before:
            (Path(root) / "cgroup.subtree_control").write_text("-hugetlb")


def test_v2_parent_moves_the_supervisors_processes_into_a_leaf_before_enabling_controllers(
        v2_cgroup_holding_a_process):
    own, pid = v2_cgroup_holding_a_process
    parent, enabled = prepare_parent(str(own), is_root=False, controllers=("hugetlb",))
    assert parent == f"{own}/taichi-sandbox" and enabled == {"hugetlb"}
    assert (own / "cgroup.procs").read_text().split() == []  # no processes in an inner node
    assert (own / "tsbx-supervisor" / "cgroup.procs").read_text().split() == [str(pid)]
    assert "hugetlb" in (own / "cgroup.subtree_control").read_text().split()
