"""Accounting holes: adversarial jobs that hide memory, CPU or processes from /proc polling.

Each job below defeats the psutil monitor in one way (see the issue "per-job cgroups"):

1. the main thread leaves with the raw exit syscall while another thread allocates, burns CPU and
   forks (the leader is a zombie, so the monitor skips it and never looks at its children);
2. CPU is burned in children that live shorter than one poll and are reaped at once;
3. memory is held outside any RSS (a memfd, a file in /dev/shm);
4. a daemon keeps changing its pid (setsid, then fork and let the parent exit, over and over);
5. a fork bomb overshoots max_processes between two polls;
6. a memory spike is allocated in a single call, faster than one poll.

Every test runs with per-job cgroups (`cgroups = "required"`: v1 on hybrid hosts, v2 on unified
ones), without them (`cgroups = "off"`, the /proc polling monitor), and on a hybrid host also on
the real cgroup v2 mount beside v1, which counts CPU and kills atomically but has no memory or
pids controller. Each asserts the verdict and its numbers, and that no process of the job survives.
What only the kernel can see (3, refused forks) is skipped, with the reason, where it does not count.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest

from sandbox import JobSpec, Limits, Supervisor, Verdict
from sandbox.job.cgroup import task_limit

from .conftest import assert_no_survivors, kernel_enforces, make_policy, second_v2_hierarchy, slow_beyond_first

MiB = 1 << 20

# Each job prints "pid N" for every process it creates that lives longer than an instant.

ZOMBIE_LEADER = """
import ctypes, os, threading, time

SYS_EXIT = {"x86_64": 60, "aarch64": 93}[os.uname().machine]

def spin(seconds):                        # each process stays under RLIMIT_CPU (2 s)
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

def hide():
    time.sleep(0.2)                       # the main thread is gone by now
    hog = b"\\1" * (1 << 30)              # 1 GiB, every page touched
    for _ in range(4):
        if os.fork() == 0:
            print(f"pid {os.getpid()}", flush=True)
            spin(1.5)
            time.sleep(3600)
            os._exit(0)
    spin(1.5)                             # 7.5 s of CPU in all
    time.sleep(3600)

print(f"pid {os.getpid()}", flush=True)
threading.Thread(target=hide).start()
ctypes.CDLL(None).syscall(SYS_EXIT, 0)    # only this thread leaves: the leader becomes a zombie
"""

SHORT_LIVED_CHILDREN = """
import os, sys, time

def spin(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

print(f"pid {os.getpid()}", flush=True)
total = float(sys.argv[1])
spent = 0.0
while spent < total:
    pid = os.fork()
    if pid == 0:
        spin(0.03)                        # shorter than one poll
        os._exit(0)
    os.waitpid(pid, 0)                    # reaped at once: never seen alive by a poll
    times = os.times()
    spent = times.children_user + times.children_system
print(f"children burned {spent:.2f} s of CPU", flush=True)
"""

HIDDEN_MEMORY = """
import os, sys, time

kind, path = sys.argv[1], sys.argv[2]
print(f"pid {os.getpid()}", flush=True)
fd = os.memfd_create("hog") if kind == "memfd" else os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
chunk = b"\\1" * (1 << 20)
for _ in range(1024):                     # 1 GiB in no process's RSS
    os.write(fd, chunk)
print("holding 1 GiB", flush=True)
time.sleep(2)
"""

PID_HOPPING_DAEMON = """
import os, sys, time

pidfile, marker = sys.argv[1], sys.argv[2]
print(f"pid {os.getpid()}", flush=True)
if os.fork() == 0:
    os.setsid()
    with open("/proc/self/comm", "w") as f:   # inherited by every fork: how the test finds them
        f.write(marker)
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if os.fork() != 0:
            os._exit(0)                       # the parent leaves; the child carries on
        with open(pidfile, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(0.002)
    os._exit(0)
while not os.path.exists(pidfile):           # return once the daemon is under way
    time.sleep(0.001)
"""

FORK_BOMB = """
import os, time

print(f"pid {os.getpid()}", flush=True)
for _ in range(8):                        # every process forks until fork fails: at most 256
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        print(f"pid {os.getpid()}", flush=True)
time.sleep(60)
"""

MEMORY_SPIKE = """
import os, time
import numpy as np

print(f"pid {os.getpid()}", flush=True)
hog = np.ones(1 << 30, dtype=np.uint8)    # 1 GiB in one call, every page written
time.sleep(2)
"""


def script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def pids(result) -> list[int]:
    return [int(p) for p in re.findall(r"pid (\d+)", result.stdout_tail)]


def run_job(sup: Supervisor, tmp_path: Path, text: str, limits: Limits, argv: tuple[str, ...] = ()):
    """Run `text` as a job; assert nothing of it survives; return the result."""
    r = sup.run(JobSpec(kernel=script(tmp_path, "job.py", text), limits=limits, argv=list(argv)))
    assert_no_survivors(sup, r.job_id, pids(r))
    return r


def breach(result):
    """The violation that decided the verdict."""
    found = [v for v in result.violations if v.action != "warn" and v.resource == result.verdict.value]
    assert found, f"no {result.verdict} violation: {result.violations}"
    return found[0]


MODES = ["cgroup", "polling", "v2-beside-v1"]  # the variants of sup


@pytest.fixture(scope="module", params=MODES)
def sup(request, state_dir):
    host = None
    if request.param == "v2-beside-v1":
        host, why = second_v2_hierarchy()
        if host is None:
            pytest.skip(why)
    setting = {"cgroup": "required", "polling": "off", "v2-beside-v1": "auto"}[request.param]
    # rootfs writable: the daemon below tells the test its pid through a file in tmp_path
    with Supervisor(make_policy(state_dir, cgroups=setting, rootfs="writable"), cgroups=host,
                    audit_log=state_dir / f"audit-accounting-{request.param}.jsonl") as supervisor:
        yield supervisor


def kernel_only(sup: Supervisor, limit: str, why: str) -> None:
    if not kernel_enforces(sup, limit):
        pytest.skip(f"no cgroup counts {limit} here ({sup.cgroups.reason}): polling cannot see {why}")


def test_zombie_leader_with_a_live_thread_is_still_accounted(sup, tmp_path):
    r = run_job(sup, tmp_path, ZOMBIE_LEADER,
                Limits(memory="512MiB", cpu_time="2s", max_processes=2, wall_time="20s"))
    assert r.verdict in (Verdict.memory, Verdict.cpu_time, Verdict.processes), r.reason
    assert r.usage.wall_seconds < 10


@slow_beyond_first("sup", MODES)
def test_cpu_of_short_lived_reaped_children_counts(sup, tmp_path):
    r = run_job(sup, tmp_path, SHORT_LIVED_CHILDREN, Limits(cpu_time="2s", wall_time="30s"), argv=("6",))
    assert r.verdict is Verdict.cpu_time, r.reason
    assert 2 <= breach(r).observed < 4
    assert r.usage.cpu_seconds >= 2


@pytest.fixture
def shm_file():
    path = Path("/dev/shm") / f"taichi-sandbox-test-{uuid.uuid4().hex}"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("kind", ["memfd", "dev_shm"])
def test_memory_outside_rss_counts(sup, tmp_path, shm_file, kind):
    kernel_only(sup, "memory", "memfd or /dev/shm pages (they are in no process's RSS)")
    r = run_job(sup, tmp_path, HIDDEN_MEMORY, Limits(memory="256MiB", wall_time="30s"),
                argv=(kind, str(shm_file)))
    assert r.verdict is Verdict.memory, r.reason
    assert breach(r).detected_by == "cgroup"
    assert r.usage.peak_memory is not None and r.usage.peak_memory <= 256 * MiB


def _daemon_groups(marker: str) -> dict[int, int]:
    """Live (non-zombie) processes named `marker`: pid -> process group, read from one /proc/PID/stat
    (the pid changes every few ms, but the group it carries stays valid while any member lives)."""
    found = {}
    for name in os.listdir("/proc"):
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        state, _ppid, pgrp = stat[stat.rfind(")") + 2:].split()[:3]
        if comm == marker and state != "Z":
            found[int(name)] = int(pgrp)
    return found


def _kill_daemon(marker: str) -> None:
    """SIGKILL the daemon's process group (it never leaves it) until none of it is left."""
    deadline = time.monotonic() + 5
    while (found := _daemon_groups(marker)) and time.monotonic() < deadline:
        for pgrp in set(found.values()):
            try:
                os.killpg(pgrp, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


@slow_beyond_first("sup", MODES)
def test_pid_hopping_daemon_never_outlives_its_job(sup, tmp_path):
    survived = []
    markers = [f"hop-{uuid.uuid4().hex[:8]}" for _ in range(5)]
    try:
        for i, marker in enumerate(markers):
            pidfile = tmp_path / f"daemon-{i}.pid"
            r = sup.run(JobSpec(kernel=script(tmp_path, "daemon.py", PID_HOPPING_DAEMON),
                                argv=[str(pidfile), marker], limits=Limits(wall_time="20s")))
            time.sleep(1)
            assert pidfile.exists(), "the daemon never started"
            alive = sorted(_daemon_groups(marker))
            if alive:
                survived.append((i, alive))
            _kill_daemon(marker)
            assert_no_survivors(sup, r.job_id, pids(r))
    finally:
        for marker in markers:
            _kill_daemon(marker)
    assert survived == [], f"daemon outlived its job in runs {survived}"


def test_fork_bomb_is_stopped_at_max_processes(sup, tmp_path):
    r = run_job(sup, tmp_path, FORK_BOMB, Limits(max_processes=32, wall_time="20s"))
    assert r.verdict is Verdict.processes, r.reason
    if kernel_enforces(sup, "processes"):  # between two polls pids.max bounds it: forks beyond it fail
        assert r.usage.peak_processes <= task_limit(32, os.cpu_count())


def test_fork_bomb_meets_pids_max_when_the_monitor_looks_away(sup, tmp_path):
    kernel_only(sup, "processes", "a refused fork")
    # The bomb starts after the monitor's first look, so only the kernel sees it before the next.
    limits = Limits(max_processes=4, cpu_threads=1, poll_interval="2s", wall_time="20s")
    r = run_job(sup, tmp_path, "import time\ntime.sleep(0.3)\n" + FORK_BOMB, limits)
    assert r.verdict is Verdict.processes, r.reason
    v = breach(r)
    helpers = sup.launcher.helpers(sup.namespaces_unavailable() is None)
    assert v.detected_by == "cgroup" and v.limit == task_limit(4 + helpers, 1) and "refused a fork" in r.reason
    assert r.usage.wall_seconds < 5


def test_memory_spike_in_one_call(sup, tmp_path):
    r = run_job(sup, tmp_path, MEMORY_SPIKE, Limits(memory="256MiB", address_space=None, wall_time="30s"))
    assert r.verdict is Verdict.memory, r.reason
    v = breach(r)
    if kernel_enforces(sup, "memory"):  # stopped at the limit by the kernel, with no overshoot
        assert v.detected_by == "cgroup" and v.observed <= 256 * MiB
        assert r.usage.peak_memory is not None and r.usage.peak_memory <= 256 * MiB
    else:  # caught at the next poll, above the limit
        assert v.detected_by == "monitor" and v.observed > 256 * MiB
