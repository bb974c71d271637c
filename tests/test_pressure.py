"""Real node memory: what pressure.py reads (for real: /proc, a v1 memory cgroup with a limit; v2 cgroup
files simulated), the pure admission and eviction decisions, and a real service in a parent memory
cgroup with a small limit and a memory eater beside it: admission holds a job the cgroup's real room
cannot cover and says why in `ps`, an OOM of the parent is not blamed on the job's own limit, and
jobs (not the service) are the kernel's first choice."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from unittest import mock

import pytest

from prometheus_client import generate_latest

from sandbox.core.limits import Node as NodePolicy, Policy, Settings
from sandbox.core.models import JobSpec
from sandbox.node.executor import SandboxExecutor
from sandbox.node.quotas import Capacity
from sandbox.job.cgroup import CgroupLimits, CgroupStats
from sandbox.node.pressure import (INTERVAL, Probe, Reading, admission_wait, cgroup_room, eviction_due, own_memory_cgroup,
                                   parse_meminfo, parse_psi)
from sandbox.watch.monitor import kernel_breaches
from sandbox.watch.verdict import foreign_oom

MiB, GiB = 1 << 20, 1 << 30
MEMORY_V1 = "/sys/fs/cgroup/memory"
needs_v1 = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists(f"{MEMORY_V1}/memory.limit_in_bytes"),
                              reason="needs root and the cgroup v1 memory hierarchy")


def reading(available=8 * GiB, some=0.0, jobs=None, room=None) -> Reading:
    return Reading(available, room, 600 * MiB if room is not None else None, jobs, some, 0.0)


# --- reading the node -------------------------------------------------------------------------------

def test_meminfo_and_psi_of_this_machine_are_read_for_real():
    probe = Probe()
    got = probe.read()
    total = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]) * 1024
    assert 0 < got.mem_available <= total and parse_meminfo("MemTotal: 4 kB\nMemAvailable: 2 kB\n") == 2048
    if os.path.exists("/proc/pressure/memory"):
        assert got.psi_some10 is not None and got.psi_full10 is not None and not got.notes
    assert got.available <= got.mem_available


def test_a_kernel_without_psi_is_said_and_never_fails(tmp_path):
    got = Probe(psi=str(tmp_path / "no-psi"), cgroup=None).read()
    assert got.psi_some10 is None and got.mem_available > 0
    assert got.notes == (f"memory pressure (PSI) not available: {tmp_path / 'no-psi'}: No such file or directory",)
    assert "PSI not available" in got.describe()
    assert admission_wait(got, 1 * MiB, 0, NodePolicy(memory_headroom=0)) is None


def test_psi_lines_parse():
    assert parse_psi("some avg10=12.50 avg60=1.00 avg300=0.10 total=5\nfull avg10=3.25 avg60=0 avg300=0 total=2\n") \
        == (12.5, 3.25)
    assert parse_psi("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n") == (0.0, None)  # no `full` line: old kernels


def test_cgroup_v2_room_from_simulated_files(tmp_path):
    """cgroup v2 file contents simulated: the tightest ancestor wins; inactive file pages are room."""
    outer, inner = tmp_path / "outer", tmp_path / "outer" / "inner"
    inner.mkdir(parents=True)
    for d, limit, current, inactive in ((outer, str(2 * GiB), 1800 * MiB, 100 * MiB), (inner, "max", 500 * MiB, 0)):
        (d / "memory.max").write_text(f"{limit}\n")
        (d / "memory.current").write_text(f"{current}\n")
        (d / "memory.stat").write_text(f"anon 1\ninactive_file {inactive}\nactive_file 0\n")
    assert cgroup_room([str(inner), str(outer)], 2) == (2 * GiB - 1700 * MiB, 2 * GiB)
    assert cgroup_room([str(inner)], 2) == (None, None)  # "max": no limit


def test_own_memory_cgroup_found_from_proc_files():
    mountinfo = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n" \
                "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    assert own_memory_cgroup(mountinfo, "4:memory:/a/b\n0::/\n") == \
        (1, ["/sys/fs/cgroup/memory/a/b", "/sys/fs/cgroup/memory/a", "/sys/fs/cgroup/memory"])
    unified = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert own_memory_cgroup(unified, "0::/system.slice/x.service\n") == \
        (2, ["/sys/fs/cgroup/system.slice/x.service", "/sys/fs/cgroup/system.slice", "/sys/fs/cgroup"])


@pytest.fixture
def parent_cgroup():
    """A v1 memory cgroup with a 600 MiB limit (no swap on top); removed with what was made under it."""
    path = Path(MEMORY_V1) / f"tsbx-test-pressure-{os.getpid()}"
    path.mkdir()
    (path / "memory.limit_in_bytes").write_text(str(600 * MiB))
    if (path / "memory.memsw.limit_in_bytes").exists():
        (path / "memory.memsw.limit_in_bytes").write_text(str(600 * MiB))
    yield path
    for pid in (path / "cgroup.procs").read_text().split():
        os.kill(int(pid), 9)
    time.sleep(0.2)
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    path.rmdir()


def start_in(cgroup: Path, *args, **kwargs) -> subprocess.Popen:
    """A process that joins `cgroup` before it runs anything."""
    return subprocess.Popen(args, preexec_fn=lambda: (cgroup / "cgroup.procs").write_text("0"), **kwargs)


EATER = "import sys, time\nb = bytearray(int(sys.argv[1]) << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n" \
        "print('ate', flush=True)\ntime.sleep(60)\n"


def eat(cgroup: Path, mib: int) -> subprocess.Popen:
    eater = start_in(cgroup, sys.executable, "-c", EATER, str(mib), stdout=subprocess.PIPE, text=True)
    assert eater.stdout.readline() == "ate\n"
    return eater


PROBE = """
import sys
from sandbox.core.limits import Policy, Settings
from sandbox.node.executor import SandboxExecutor
from sandbox.node.pressure import Probe
r = Probe().read()
with SandboxExecutor(policy=Policy(settings=Settings(state_dir=sys.argv[1]))) as ex:
    print(r.cgroup_room, r.cgroup_limit, r.available, r.mem_available, ex.capacity.memory)
"""


@needs_v1
def test_room_in_a_real_v1_memory_cgroup_with_a_limit_is_what_is_available(parent_cgroup, tmp_path):
    eater = eat(parent_cgroup, 200)
    probe = start_in(parent_cgroup, sys.executable, "-c", PROBE, str(tmp_path), stdout=subprocess.PIPE, text=True,
                     cwd=Path(__file__).parent.parent)
    room, limit, available, mem_available, capacity = map(int, probe.communicate(timeout=30)[0].split())
    eater.kill()
    assert limit == 600 * MiB and available == room < mem_available
    assert 300 * MiB < room < 400 * MiB  # 600 MiB less the eater's 200 MiB and the two interpreters
    assert capacity == 600 * MiB  # the node's capacity is the cgroup's limit, not the host's memory


def test_every_launcher_makes_jobs_the_kernels_first_choice(any_supervisor, tmp_path):
    path = tmp_path / "adj.py"
    path.write_text("print(open('/proc/self/oom_score_adj').read().strip())\n")
    result = any_supervisor.run(JobSpec(kernel=str(path)))
    assert result.verdict.value == "ok" and result.stdout_tail == "500\n"


def test_the_executor_exports_the_psi_it_reads(tmp_path):
    with SandboxExecutor(capacity=Capacity(1, 8 * GiB, None),
                         policy=Policy(settings=Settings(state_dir=str(tmp_path)))) as ex:
        text = generate_latest(ex.metrics.registry).decode()
        read = ex.pressure
    assert read.available > 0
    if read.psi_some10 is not None:  # this kernel has PSI
        assert re.search(r"\ntaichi_sandbox_node_memory_pressure_percent [0-9.e+]+\n", text)
    assert text.count("\n# TYPE taichi_sandbox_node_memory_available_bytes ") <= 1  # one name, one metric


# --- decisions --------------------------------------------------------------------------------------

def test_admission_waits_for_real_memory_and_for_pressure():
    node = NodePolicy(memory_headroom="1GiB", memory_pressure_wait=10)
    assert admission_wait(reading(8 * GiB), 4 * GiB, 0, node) is None
    why = admission_wait(reading(int(2.5 * GiB)), 4 * GiB, 0, node)  # the case: 20 GiB eaten outside
    assert why == ("node memory: 2.50 GiB available, PSI some avg10 0.0%; it needs its 4.00 GiB reservation + "
                   "1.00 GiB headroom ([node] memory_headroom)")
    # running jobs reserve 3 GiB and use 1 GiB: the 2 GiB they may still take are not available to others
    assert "2.00 GiB of it held for running jobs' reservations" in admission_wait(reading(6 * GiB, jobs=GiB), 4 * GiB,
                                                                                 3 * GiB, node)
    assert admission_wait(reading(6 * GiB, jobs=3 * GiB), 4 * GiB, 3 * GiB, node) is None
    assert admission_wait(reading(2 * GiB), None, 0, node) is None  # no memory limit: only the headroom
    assert admission_wait(reading(8 * GiB, some=12.5), GiB, 0, node) == \
        "node memory pressure: PSI some avg10 12.5% > 10% ([node] memory_pressure_wait)"
    assert admission_wait(None, GiB, 0, node) is None


def test_eviction_threshold():
    node = NodePolicy(evict_available="256MiB", evict_pressure=50)
    assert eviction_due(reading(GiB, some=10), node) is None
    assert eviction_due(reading(100 * MiB), node) == ("node memory pressure: 100 MiB available, PSI some avg10 0.0%, "
                                                      "below [node] evict_available 256 MiB")
    assert eviction_due(reading(GiB, some=75), node) == "node memory pressure: PSI some avg10 75.0% > " \
                                                         "[node] evict_pressure 50%"
    assert eviction_due(reading(100 * MiB), NodePolicy(evict_available=0, evict_pressure=100)) is None


def test_an_oom_kill_below_the_jobs_own_limit_is_not_its_memory_violation():
    limits = CgroupLimits(memory=300 * MiB)
    foreign = CgroupStats(memory_peak=150 * MiB, oom_kills=1)
    assert kernel_breaches(foreign, limits) == []
    assert foreign_oom(foreign, limits) == (
        "its cgroup peak 150.0 MiB, below its limit 300.0 MiB; the job's cgroup counted 1 OOM kill(s) and no hit of "
        "its own limit: the OOM was an ancestor cgroup's or the host's")
    own_v1 = CgroupStats(memory_peak=300 * MiB, oom_kills=1)
    own_v2 = CgroupStats(memory_peak=None, oom_kills=1, limit_hits=1)  # simulated v2 memory.events `oom 1`
    for own in (own_v1, own_v2):
        assert [b[0] for b in kernel_breaches(own, limits)] == ["memory"] and foreign_oom(own, limits) is None


# --- a real service in a small parent cgroup --------------------------------------------------------

def small_node(parent_cgroup, root: Path, node: str = "", bob: str = ""):
    """A real service (tests.test_service.Node) in `parent_cgroup`: jobs reserve 300 MiB, headroom 64 MiB;
    `node` and `bob`: more lines for its [node] and [tenants.bob] tables."""
    from tests.test_service import Node

    class SmallNode(Node):
        def start(self) -> None:
            self.limits.write_text(self.limits.read_text().replace('memory = "1GiB"', 'memory = "300MiB"')
                                   .replace("[node]\n", f'[node]\nmemory_headroom = "64MiB"\n{node}')
                                   .replace("[tenants.bob]\n", f"[tenants.bob]\n{bob}"))
            joined = partial(subprocess.Popen, preexec_fn=lambda: (parent_cgroup / "cgroup.procs").write_text("0"))
            with mock.patch.object(subprocess, "Popen", joined):
                super().start()

    return SmallNode(root)


@pytest.fixture
def service(parent_cgroup, tmp_path):
    node = small_node(parent_cgroup, tmp_path / "node")
    yield node
    node.stop(timeout=30)


def follow(node, source: str) -> tuple[threading.Thread, list]:
    answers: list = []
    thread = threading.Thread(target=lambda: answers.extend(node.ask(
        {"op": "submit", "jobs": [{"kernel": "k.py", "source": source, "tenant": "bob"}], "follow": True,
         "output": False})))
    thread.start()
    return thread, answers


def wait_for(check, within: float = 10.0):
    deadline = time.monotonic() + within
    while not (got := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return got


def result_of(thread, answers) -> dict:
    thread.join(30)
    return [a["result"] for a in answers if a["type"] == "result"][0]


@needs_v1
def test_a_job_the_cgroups_real_room_cannot_cover_waits_and_ps_says_why(service, parent_cgroup):
    eater = eat(parent_cgroup, 330)  # what is left under 600 MiB cannot hold 300 MiB + 64 MiB headroom
    time.sleep(INTERVAL + 0.1)  # admission uses the watch's latest reading
    thread, answers = follow(service, "print('ran')\n")
    row = wait_for(lambda: [j for j in service.ask({"op": "ps"})[0]["jobs"] if j["waiting"]])[0]
    assert row["state"] == "queued" and row["waiting"].startswith("node memory: ")
    assert "(in the service's cgroup, limit 600 MiB)" in row["waiting"]
    assert row["waiting"].endswith("it needs its 300 MiB reservation + 64 MiB headroom ([node] memory_headroom)")
    eater.kill()  # the transient pressure passes: the job starts, nothing was rejected
    assert result_of(thread, answers)["verdict"] == "ok"


@needs_v1
def test_a_job_killed_by_its_parents_oom_is_not_blamed_on_its_own_limit(service, parent_cgroup):
    job = "import time\nb = bytearray(150 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n" \
          "print(open('/proc/self/oom_score_adj').read().strip(), flush=True)\ntime.sleep(30)\n"
    thread, answers = follow(service, job)
    wait_for(lambda: any(((j["usage"] or {}).get("memory") or 0) > 150 * MiB
                         for j in service.ask({"op": "ps"})[0]["jobs"]))
    eater = start_in(parent_cgroup, sys.executable, "-c", EATER, "500", stdout=subprocess.PIPE)
    result = result_of(thread, answers)
    assert eater.poll() is None, "the kernel chose the eater, not the job"
    eater.kill()
    assert result["verdict"] == "crashed" and result["signal"] == "SIGKILL"
    assert result["reason"].startswith("killed by the kernel under node memory pressure (SIGKILL; its cgroup peak ")
    assert "below its limit 300.0 MiB; the job's cgroup counted 1 OOM kill(s) and no hit of its own limit" \
           in result["reason"]
    assert not [v for v in result["violations"] if v["resource"] == "memory"]


@needs_v1
def test_jobs_are_the_kernels_first_choice_and_cannot_take_the_services_protection(service):
    job = "print(open('/proc/self/oom_score_adj').read().strip())\nfor value in ('-900', '0'):\n    try:\n" \
          "        with open('/proc/self/oom_score_adj', 'w') as f:\n            f.write(value)\n" \
          "        print(value, 'lowered')\n    except OSError as e:\n        print(value, 'refused', e.errno)\n"
    thread, answers = follow(service, job)
    out = result_of(thread, answers)["stdout_tail"].splitlines()
    # +500 written while still root with CAP_SYS_RESOURCE is the floor; without it, the inherited 0 is
    assert out == ["500", "-900 refused 13", "0 refused 13" if _has_cap_sys_resource() else "0 lowered"]
    served = int(Path(f"/proc/{service.proc.pid}/oom_score_adj").read_text())
    forkserver = [p for p in map(str, Path("/proc").iterdir()) if p.split("/")[-1].isdigit()
                  and "sandbox.job.forkserver" in _cmdline(p) and str(service.root) in _cmdline(p)]
    adjs = [served, *(int(Path(f"{p}/oom_score_adj").read_text()) for p in forkserver)]
    if _has_cap_sys_resource():
        assert adjs == [-900, -800]
    else:  # this container: root without CAP_SYS_RESOURCE cannot lower it; the service says so
        assert adjs == [0, 0]
        assert "not protected from the OOM killer: cannot set oom_score_adj -900: Permission denied (lowering it " \
               "needs CAP_SYS_RESOURCE)" in (service.root / "service.log").read_text()


def _cmdline(proc: str) -> str:
    try:
        return Path(f"{proc}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def _has_cap_sys_resource() -> bool:
    caps = int([line for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("CapEff:")][0].split()[1], 16)
    return bool(caps >> 24 & 1)


@needs_v1
def test_past_the_eviction_threshold_a_preemptible_job_is_preempted_before_the_oom_killer(parent_cgroup, tmp_path):
    """A preemptible job holding 100 MiB under 600 MiB; a process outside the sandbox, beside the service,
    grows until less than [node] evict_available is left: the job is ended with verdict `preempted` and the
    evidence, and the kernel's OOM killer never had to choose."""
    node = small_node(parent_cgroup, tmp_path / "node", node='evict_available = "200MiB"\n', bob="preemptible = true\n")
    try:
        job = "import time\nb = bytearray(100 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\n" \
              "print('holding', flush=True)\ntime.sleep(60)\n"
        thread, answers = follow(node, job)
        wait_for(lambda: any(((j["usage"] or {}).get("memory") or 0) > 100 * MiB
                             for j in node.ask({"op": "ps"})[0]["jobs"]))
        eater = eat(parent_cgroup, 250)  # 600 - ~100 (job) - ~80 (service, fork-server) - 250: under 200 MiB left
        result = result_of(thread, answers)
        assert eater.poll() is None
        eater.kill()
    finally:
        node.stop(timeout=30)
    assert result["verdict"] == "preempted", result["reason"]
    assert "node memory pressure: " in result["reason"]
    assert "below [node] evict_available 200 MiB" in result["reason"]
