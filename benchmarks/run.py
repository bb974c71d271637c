"""Performance targets P1-P5 of taichi-sandbox, measured side by side in one run on this machine.

Prints one table (target, median, p99, measured value, goal, pass/fail) with the machine
description, and writes benchmarks/results.json. `make bench` runs it.

P1  tiny CPU job through a running supervisor ÷ plain `python kernel.py`           ≤ 0.40
P2  sandboxed job ÷ the same launcher with monitoring and limits off (the floor)   ≤ 1.10
P3  100 tiny jobs at concurrency 2 (executor)                                      ≥ 6 jobs/s
P4a RSS passes the limit → SIGKILL sent, polling (cgroups off; upper bound)        p99 ≤ 100 ms
P4a the kernel's peak memory charge over the limit, with job cgroups                 0 MiB
P4b wall deadline → SIGTERM sent                                                   p99 ≤ 50 ms
P4c SIGTERM → SIGKILL versus grace                                                  |error| ≤ 50 ms
P5a supervisor CPU per monitored job at the default poll interval                  ≤ 1% of a core
P5b supervisor RSS with 32 concurrent jobs                                         ≤ 80 MiB
CLI run from a shell (`taichi-sandbox run`, warm server) ÷ `python kernel.py`      ≤ 1.0
cgroup create + join + remove per job                                              median ≤ 5 ms
Same tiny job with job cgroups ÷ with cgroups off                                  report
Namespaces (relay, init, mounts) added to a tiny job                               median ≤ 10 ms
System-call filter loaded in a forked job / added to a tiny job                    median ≤ 5 ms
Offline kernel cache: a job with an empty per-tenant cache ÷ one with a warm cache   report
A 1024×1024 float32 return value added to a job (result files written and read)   median ≤ 20 ms
A shipped callable added to a job, versus the same function as `file.py:function`  median ≤ 5 ms
Disk limit: a job's own filesystem image (make, mount, unmount, remove)            median ≤ 5 ms
... and a tiny job with `disk = "4GiB"` (an image) − the same job without          report
S1  `taichi-sandbox run tiny.py --json` through a running node service ÷ plain      ≤ 0.6
S2  10 000 jobs queued on the service by 50 tenants: admission latency              p99 ≤ 5 ms
S3  ... and the service's RSS with them queued                                      ≤ 150 MiB
`taichi-sandbox report` over a year of audit logs, 1 000 000 records (accounting.py)  ≤ 5 s
Start latency of a high-priority job on a node full of preemptible work (preemption.py)  ≤ grace + 1 s
Cluster quota authority, 200 simulated executors (authority.py): admissions/s     ≥ 2000
... and admission latency (acquire call → attach reply, saved to the GCS KV)       p99 ≤ 20 ms
RayExecutor throughput ÷ plain Ray tasks, and ÷ sandbox.ray.submit (ray_throughput.py)  ≥ 0.85
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.table import Table

from sandbox import JobSpec, Limits, Policy, Supervisor
from sandbox.job.cgroup import CgroupLimits, discover
from sandbox.job import syscalls
from sandbox.node.executor import Capacity, SandboxExecutor
from sandbox.job.interpreter import base_env
from sandbox.core.limits import GiB, Settings, Tenant
from sandbox.job.disk import JobDisks
from sandbox.node import frames

import cold_start  # benchmarks/cold_start.py: this script's directory is on sys.path
from accounting import report_row  # benchmarks/accounting.py: likewise
from preemption import preemption_latency  # benchmarks/preemption.py: likewise
from authority import authority_rows  # benchmarks/authority.py: likewise
from ray_throughput import ray_throughput  # benchmarks/ray_throughput.py: likewise

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "kernels" / "tiny.py")
MEMORY_JUMP = """
import time, numpy as np, taichi as ti
ti.init(arch=ti.cpu)
base = np.ones(64 << 18, dtype=np.float32)        # 64 MiB, below the limit
time.sleep(0.3)                                    # then 256 MiB at once, above it
jump = np.ones(256 << 18, dtype=np.float32)
time.sleep(60)
"""
SLEEP = "import time\ntime.sleep({s})\n"
FIELD = """
import numpy as np


def field(keep):
    a = np.ones((1024, 1024), np.float32)
    return a if keep else None
"""
ANSWER = "def answer():\n    return 42\n"
JOIN_SELF = """
import sys, time
t = time.perf_counter()
for path in sys.argv[1:]:
    with open(path, "w") as f:
        f.write("0")
print((time.perf_counter() - t) * 1000)
"""


NODE_POLICY = """
[defaults]
memory = "1GiB"
[node]
cpu_slots = 1  # the first job holds the only slot: the rest stay queued
{tenants}
[sandbox]
state_dir = "{state}"
[service]
socket = "{socket}"
request_rate = "unlimited"
max_queued = 20000
drain_timeout = "10ms"
"""


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def answer():
    """The shipped callable of the callable row (defined in __main__: shipped by value, with this file's
    source), the same as ANSWER."""
    return 42


def paired(a, b, n: int) -> tuple[list[float], list[float]]:
    """Times of `a` and `b`, alternated so that drift on a shared machine hits both alike."""
    out_a, out_b = [], []
    for _ in range(n):
        out_a += timed(a, 1)
        out_b += timed(b, 1)
    return out_a, out_b


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


class Bench:
    def __init__(self, n: int, state: str) -> None:
        self.n, self.state = n, state
        self.policy = Policy(settings=Settings(state_dir=state))
        self.polling = Policy(settings=Settings(state_dir=state, cgroups="off"))
        self.shared = Policy(settings=Settings(state_dir=state, isolation="off", allow_root=True))
        self.unfiltered = Policy(settings=Settings(state_dir=state, syscall_filter="off"))
        self.rows: list[dict] = []

    def add(self, name: str, samples: list[float] | None, value: float, goal: str, ok: bool | None,
            unit: str = "") -> None:
        self.rows.append({"target": name, "median": statistics.median(samples) if samples else None,
                          "p99": pct(samples, 0.99) if samples else None, "value": value, "unit": unit,
                          "goal": goal, "pass": ok})

    def plain(self) -> None:
        env = {**base_env(), "HOME": self.state}
        subprocess.run([sys.executable, TINY], check=True, capture_output=True, env=env)

    def p1_p2(self, sup: Supervisor) -> None:
        sup.run(JobSpec(kernel=TINY))  # warm: fork-server up, kernel cache filled
        plain = timed(self.plain, self.n)
        full = timed(lambda: sup.run(JobSpec(kernel=TINY, limits=Limits(cpu_time="10s", wall_time="20s",
                                                                         memory="1GiB"))), self.n)
        floor = timed(lambda: sup.run(JobSpec(kernel=TINY, limits=Limits(poll_interval="1h", address_space=None))),
                      self.n)
        r1 = statistics.median(full) / statistics.median(plain)
        r2 = statistics.median(full) / statistics.median(floor)
        self.add("plain python kernel.py (s)", plain, statistics.median(plain), "reference", None, "s")
        self.add("P1 sandboxed job ÷ plain", full, r1, "≤ 0.40", r1 <= 0.40)
        self.add("P2 sandboxed ÷ monitoring off", floor, r2, "≤ 1.10", r2 <= 1.10)

    def p3(self, sup: Supervisor) -> None:
        with SandboxExecutor(max_concurrent=2, capacity=Capacity(2, 64 * GiB, None), supervisor=sup) as ex:
            t = time.perf_counter()
            results = list(ex.map([JobSpec(kernel=TINY, limits=Limits(memory="1GiB")) for _ in range(100)]))
            rate = len(results) / (time.perf_counter() - t)
        assert all(r.ok for r in results)
        self.add("P3 100 tiny jobs, concurrency 2 (jobs/s)", None, rate, "≥ 6", rate >= 6, "jobs/s")

    def p4(self, sup: Supervisor, polling: Supervisor, tmp: Path) -> None:
        script = tmp / "jump.py"
        script.write_text(MEMORY_JUMP)
        memory, overshoot = [], []
        for _ in range(self.n):
            r = polling.run(JobSpec(kernel=str(script), limits=Limits(memory="200MiB")))
            v = next(v for v in r.violations if v.action != "warn")
            at = next(i for i, s in enumerate(r.timeline) if s.rss > 200 << 20)  # samples may follow the kill
            below, detected = r.timeline[at - 1], r.timeline[at]
            # The crossing happened after the last reading below the limit: from that reading to the
            # SIGKILL bounds crossing -> kill from above, without the job's own allocation time.
            memory.append((detected.t - below.t + r.termination.sigkill_at - v.at) * 1000)
        self.add("P4a RSS over limit → SIGKILL, polling (ms, upper bound)", memory, pct(memory, 0.99), "p99 ≤ 100",
                 pct(memory, 0.99) <= 100, "ms")
        if "memory" in sup.cgroups.enforces():
            for _ in range(self.n):
                r = sup.run(JobSpec(kernel=str(script), limits=Limits(memory="200MiB")))
                assert r.verdict.value == "memory" and r.usage.peak_memory is not None, r.reason
                overshoot.append(max(0, r.usage.peak_memory - (200 << 20)) / 2**20)
            self.add(f"P4a kernel peak charge over the limit, {sup.cgroups.label} (MiB)", overshoot, max(overshoot),
                     "0", max(overshoot) == 0, "MiB")
        sleeper = tmp / "sleep.py"
        sleeper.write_text(SLEEP.format(s=60))
        wall = []
        for _ in range(self.n):
            r = sup.run(JobSpec(kernel=str(sleeper), limits=Limits(wall_time="0.5s")))
            v = next(v for v in r.violations if v.action != "warn")
            wall.append((v.observed - v.limit) * 1000)
        self.add("P4b wall deadline → SIGTERM (ms)", wall, pct(wall, 0.99), "p99 ≤ 50", pct(wall, 0.99) <= 50, "ms")
        grace = []
        for _ in range(max(3, self.n // 3)):
            r = sup.run(JobSpec(kernel=str(ROOT / "kernels" / "sigterm_ignorer.py"),
                                limits=Limits(wall_time="1s", grace="0.5s")))
            grace.append((r.termination.sigkill_at - r.termination.sigterm_at - 0.5) * 1000)
        worst = max(abs(g) for g in grace)
        self.add("P4c SIGTERM → SIGKILL minus grace (ms)", grace, worst, "|error| ≤ 50", worst <= 50, "ms")

    def p5(self, sup: Supervisor, tmp: Path) -> None:
        me = psutil.Process()
        sleeper = tmp / "sleep5.py"
        sleeper.write_text(SLEEP.format(s=6))
        jobs, window = 8, 4.0
        threads = [threading.Thread(target=sup.run, args=(JobSpec(kernel=str(sleeper), limits=Limits(wall_time="20s")),))
                   for _ in range(jobs)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        c0, t0 = sum(me.cpu_times()[:2]), time.perf_counter()
        time.sleep(window)
        cpu = (sum(me.cpu_times()[:2]) - c0) / (time.perf_counter() - t0) / jobs * 100
        for t in threads:
            t.join()
        self.add("P5a supervisor CPU per job, 50 ms poll (% core)", None, cpu, "≤ 1", cpu <= 1, "%")
        sleeper.write_text(SLEEP.format(s=8))
        threads = [threading.Thread(target=sup.run, args=(JobSpec(kernel=str(sleeper), limits=Limits(wall_time="30s")),))
                   for _ in range(32)]
        for t in threads:
            t.start()
        peak = 0
        while any(t.is_alive() for t in threads):
            peak = max(peak, me.memory_info().rss)
            time.sleep(0.2)
        mib = peak / 2**20
        self.add("P5b supervisor RSS, 32 concurrent jobs (MiB)", None, mib, "≤ 80", mib <= 80, "MiB")

    def offline_cache(self) -> None:
        """A tiny job with an empty per-tenant kernel cache (a new tenant each time) vs a warm one."""
        n = max(5, self.n // 2)
        tenants = {f"cold{i}": Tenant() for i in range(n)} | {"warm": Tenant()}
        policy = Policy(tenants=tenants, settings=Settings(state_dir=self.state))
        with Supervisor(policy, audit_log=Path(self.state) / "cache-audit.jsonl") as sup:
            sup.run(JobSpec(kernel=TINY, tenant="warm"))
            cold = [sup.run(JobSpec(kernel=TINY, tenant=f"cold{i}")).usage.wall_seconds for i in range(n)]
            warm = [sup.run(JobSpec(kernel=TINY, tenant="warm")).usage.wall_seconds for _ in range(n)]
        ratio = statistics.median(cold) / statistics.median(warm)
        self.add("offline kernel cache: cold ÷ warm job", cold, ratio, "report", None)

    def cgroup_lifecycle(self) -> None:
        """What a job cgroup adds to a job: create it with limits, the child moving itself in (timed
        inside that process, as the job's child does it), remove it once empty. Spaced like jobs, so
        no migration profits from a recent one."""
        host = discover()
        if host.version is None:
            self.add(f"cgroup create + join + remove (skipped: {host.reason})", None, 0.0, "≤ 5", None, "ms")
            return
        costs = []
        for i in range(max(20, self.n)):
            time.sleep(0.1)
            t = time.perf_counter()
            cgroup = host.create(f"bench-{i}", CgroupLimits(memory=1 << 30, tasks=128, cpus=1))
            create = time.perf_counter() - t
            joined = subprocess.run([sys.executable, "-c", JOIN_SELF, *cgroup.join_files()], capture_output=True,
                                    text=True, check=True)
            t = time.perf_counter()
            cgroup.remove()
            costs.append((create + time.perf_counter() - t) * 1000 + float(joined.stdout))
        median = statistics.median(costs)
        self.add(f"cgroup create + join + remove per job, {host.label} (ms)", costs, median, "median ≤ 5",
                 median <= 5, "ms")

    def cgroups_on_off(self, sup: Supervisor, polling: Supervisor) -> None:
        spec = lambda: JobSpec(kernel=TINY, limits=Limits(memory="1GiB", max_processes=64, cpu_time="10s"))  # noqa: E731
        polling.run(spec())
        on = timed(lambda: sup.run(spec()), self.n)
        off = timed(lambda: polling.run(spec()), self.n)
        ratio = statistics.median(on) / statistics.median(off)
        self.add(f"tiny job, {sup.cgroups.label} ÷ cgroups off", on, ratio, "report", None)

    def namespaces_cost(self, sup: Supervisor) -> None:
        if sup.namespaces_unavailable() is not None:
            self.add(f"namespaces per job (skipped: {sup.namespaces_unavailable()})", None, 0.0, "≤ 10", None, "ms")
            return
        spec = lambda: JobSpec(kernel=TINY, limits=Limits(memory="1GiB", cpu_time="10s"))  # noqa: E731
        with Supervisor(self.shared, audit_log=Path(self.state) / "audit-shared.jsonl") as shared:
            shared.run(spec())
            off = timed(lambda: shared.run(spec()), self.n)
            on = timed(lambda: sup.run(spec()), self.n)
        added = (statistics.median(on) - statistics.median(off)) * 1000
        self.add("namespaces per job: median with − without (ms)", on, added, "≤ 10", added <= 10, "ms")

    def syscall_filter_cost(self, sup: Supervisor) -> None:
        """The filter's load in a forked process (built beforehand, as the fork-server does), and a tiny
        job with the filter against one without (alternated)."""
        syscalls.prepare()
        if syscalls.unavailable() is not None:
            self.add(f"system-call filter (skipped: {syscalls.unavailable()})", None, 0.0, "≤ 5", None, "ms")
            return
        loads = []
        for _ in range(max(20, self.n)):
            r, w = os.pipe()
            if os.fork() == 0:
                t = time.perf_counter()
                syscalls.install()
                os.write(w, str((time.perf_counter() - t) * 1000).encode())
                os._exit(0)
            os.close(w)
            loads.append(float(os.read(r, 64)))
            os.close(r)
            os.wait()
        self.add("system-call filter load in a forked job (ms)", loads, statistics.median(loads), "report", None, "ms")
        spec = lambda: JobSpec(kernel=TINY, limits=Limits(memory="1GiB", cpu_time="10s"))  # noqa: E731
        with Supervisor(self.unfiltered, audit_log=Path(self.state) / "audit-unfiltered.jsonl") as unfiltered:
            unfiltered.run(spec())
            on, off = paired(lambda: sup.run(spec()), lambda: unfiltered.run(spec()), self.n)
        added = (statistics.median(on) - statistics.median(off)) * 1000
        self.add("system-call filter per job: median with − without (ms)", on, added, "≤ 5", added <= 5, "ms")

    def result_cost(self, sup: Supervisor, tmp: Path) -> None:
        """The same job function returning a 1024×1024 float32 array, or None."""
        script = tmp / "field.py"
        script.write_text(FIELD)
        spec = lambda keep: JobSpec(kernel=f"{script}:field", args=[keep])  # noqa: E731
        assert sup.run(spec(True)).return_value.shape == (1024, 1024)
        on, off = paired(lambda: sup.run(spec(True)), lambda: sup.run(spec(False)), self.n)
        added = (statistics.median(on) - statistics.median(off)) * 1000
        self.add("1024×1024 float32 result: median with − without (ms)", on, added, "≤ 20", added <= 20, "ms")

    def callable_cost(self, sup: Supervisor, tmp: Path) -> None:
        """A callable shipped from __main__ (dill, source, unpickling in the child) versus the same
        function as `file.py:function` (imported from its file in the child)."""
        script = tmp / "answer.py"
        script.write_text(ANSWER)
        assert sup.run(JobSpec(kernel=answer)).return_value == 42
        shipped, by_file = paired(lambda: sup.run(JobSpec(kernel=answer)),
                                  lambda: sup.run(JobSpec(kernel=f"{script}:answer")), self.n)
        added = (statistics.median(shipped) - statistics.median(by_file)) * 1000
        self.add("shipped callable: median − file.py:function (ms)", shipped, added, "≤ 5", added <= 5, "ms")

    def disk_cost(self, sup: Supervisor) -> None:
        """What a disk limit held by a filesystem image adds per job: a work dir with an image (written
        from its template, attached, mounted, then unmounted and freed) over a plain one, both made
        and removed alike, the template made once before; and a tiny job with the default `disk`
        versus the same job without a disk limit."""
        disks = JobDisks(Settings(state_dir=self.state))
        if disks.unavailable is not None:
            self.add(f"disk image per job (skipped: {disks.unavailable})", None, 0.0, "≤ 5", None, "ms")
            return
        disks.make("warm", 4 * GiB).remove()
        image, plain = paired(lambda: disks.make("bench", 4 * GiB).remove(),
                              lambda: disks.make("bench", None).remove(), max(20, self.n))
        added = [(a - b) * 1000 for a, b in zip(image, plain)]
        median = statistics.median(added)
        self.add("disk image per job: attach + mount + unmount, over a plain work dir (ms)", added, median,
                 "median ≤ 5", median <= 5, "ms")
        spec = lambda disk: JobSpec(kernel=TINY, limits=Limits(disk=disk))  # noqa: E731
        sup.run(spec("4GiB"))
        on, off = paired(lambda: sup.run(spec("4GiB")), lambda: sup.run(spec(None)), self.n)
        added = (statistics.median(on) - statistics.median(off)) * 1000
        self.add("tiny job with a disk image − without a disk limit (ms)", on, added, "report", None, "ms")

    def node_service(self) -> None:
        """S1-S3 against a real `taichi-sandbox serve` process."""
        root = Path(self.state) / "node"
        root.mkdir()
        sock, limits, ready_path = root / "s.sock", root / "limits.toml", root / "notify"
        tenants = "".join(f"[tenants.t{i}]\nmax_queued = 1000\n" for i in range(50))
        limits.write_text(NODE_POLICY.format(tenants=tenants, state=self.state, socket=sock))
        ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ready.bind(str(ready_path))
        ready.settimeout(60)
        service = subprocess.Popen([sys.executable, "-m", "sandbox", "serve", "--limits-file", str(limits)],
                                   env={**os.environ, "NOTIFY_SOCKET": str(ready_path)}, stderr=subprocess.DEVNULL)
        try:
            assert ready.recv(64) == b"READY=1"
            client = [sys.executable, "-m", "sandbox", "run", TINY, "--json", "--socket", str(sock)]
            subprocess.run(client, capture_output=True, check=True)  # warm: fork-server up, kernel cache filled
            through = timed(lambda: subprocess.run(client, capture_output=True, check=True), self.n)
            plain = timed(self.plain, self.n)
            ratio = statistics.median(through) / statistics.median(plain)
            self.add("S1 `run tiny.py --json` via the node service ÷ plain", through, ratio, "≤ 0.6", ratio <= 0.6)
            source = Path(TINY).read_text()
            latencies = []
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(str(sock))
                for i in range(10_000):
                    job = {"kernel": "tiny.py", "source": source, "tenant": f"t{i % 50}"}
                    if i == 0:
                        job.update(kernel="sleep.py", source=SLEEP.format(s=600))
                    t = time.perf_counter()
                    frames.send(conn, {"op": "submit", "jobs": [job]})
                    answer = frames.recv(conn)
                    latencies.append((time.perf_counter() - t) * 1000)
                    assert answer["jobs"][0]["state"] == "queued", answer
            rss = psutil.Process(service.pid).memory_info().rss / 2**20
            p99 = pct(latencies, 0.99)
            self.add("S2 admission, 10 000 jobs queued by 50 tenants (ms)", latencies, p99,
                     "p99 ≤ 5", p99 <= 5, "ms")
            self.add("S3 service RSS with 10 000 jobs queued (MiB)", None, rss, "≤ 150", rss <= 150, "MiB")
        finally:
            service.terminate()  # drain_timeout 10 ms: every job is cancelled with its verdict
            service.wait(120)
            ready.close()

    def cli_cold(self) -> None:
        for name, samples, value, goal, ok in cold_start.measure(TINY, {**base_env(), "HOME": self.state}, self.state,
                                                                 max(5, self.n // 2)):
            self.add(name, samples, value, goal, ok)


SUPERVISED = ("p1_p2", "p3", "p4", "p5", "cgroups_on_off", "namespaces_cost", "syscall_filter_cost", "result_cost",
              "callable_cost", "disk_cost")  # the rows that take the bench's supervisors
ON_THEIR_OWN = ("cgroup_lifecycle", "offline_cache", "cli_cold", "node_service", "report", "preemption", "authority",
                "ray_throughput")
MODULES = {"report": report_row, "preemption": preemption_latency, "authority": authority_rows,
           "ray_throughput": ray_throughput}  # rows of a module of their own


def _all(bench: Bench, state: Path) -> None:
    _only(bench, [*SUPERVISED, *ON_THEIR_OWN], state)


def _only(bench: Bench, names: list[str], state: Path) -> None:
    """Run the rows `names`, in the table's order; supervisors only when a row needs them."""
    unknown = sorted(set(names) - {*SUPERVISED, *ON_THEIR_OWN})
    if unknown:
        raise SystemExit(f"unknown rows {unknown}: choose from {', '.join((*SUPERVISED, *ON_THEIR_OWN))}")
    if any(name in names for name in SUPERVISED):
        with Supervisor(bench.policy, audit_log=state / "audit.jsonl") as sup, \
                Supervisor(bench.polling, audit_log=state / "audit-polling.jsonl") as polling:
            args = {"sup": sup, "polling": polling, "tmp": state}
            for name in (n for n in SUPERVISED if n in names):
                method = getattr(bench, name)
                method(*(args[p] for p in method.__code__.co_varnames[1:method.__code__.co_argcount]))
    for name in (n for n in ON_THEIR_OWN if n in names):
        if name in MODULES:
            MODULES[name](bench)
        else:
            getattr(bench, name)()


def main() -> None:
    parser = argparse.ArgumentParser(description="taichi-sandbox performance targets")
    parser.add_argument("-n", type=int, default=15, help="repetitions per timed target")
    parser.add_argument("--only", help="comma-separated rows to run, by method name (e.g. cli_cold)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tsbx-bench-") as state:
        os.chmod(state, 0o711)  # a root supervisor's jobs run as their tenant's uid: they read the scripts here
        bench = Bench(args.n, state)
        if args.only:
            _only(bench, args.only.split(","), Path(state))
        else:
            _all(bench, Path(state))
    machine = (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
               f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
               f"{platform.system()} {platform.release()}")
    table = Table(title=f"taichi-sandbox performance ({machine})")
    for column in ("target", "median", "p99", "measured", "goal", "pass"):
        table.add_column(column, justify="left" if column in ("target", "goal") else "right")
    for row in bench.rows:
        fmt = (lambda v: "-" if v is None else f"{v:.3f}")
        verdict = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "-"}[row["pass"]]
        table.add_row(row["target"], fmt(row["median"]), fmt(row["p99"]), f"{row['value']:.3f} {row['unit']}",
                      row["goal"], verdict)
    console = Console()
    (console if console.is_terminal else Console(width=150)).print(table)
    if args.only:
        return  # results.json keeps the whole table
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps({"machine": machine, "rows": bench.rows},
                                                                 indent=2) + "\n")


if __name__ == "__main__":
    main()
