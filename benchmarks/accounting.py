"""Benchmark row for `taichi-sandbox report`: a year of audit logs, 1 000 000 records, in rotated files.

`generate(directory, records)` writes a log as the service writes it (submitted, started, job
records with usage, limits and reservation; violations; alerts; refused requests) spread over one
year, in the rotated files logrotate leaves (`audit.jsonl.N.gz` ... `audit.jsonl.2.gz`,
`audit.jsonl.1`, `audit.jsonl`). `report_row(bench)` times `taichi-sandbox report --json` over it
(a fresh process, as an operator runs it). Alone: `python benchmarks/accounting.py [--records N]`.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

YEAR = 365 * 86400.0
FILES = 12  # one per month: 10 compressed, one plain (.1), the live log
VERDICTS = ["ok"] * 80 + ["error"] * 8 + ["memory", "cpu_time", "wall_time", "cancelled", "rejected", "preempted",
                                          "crashed", "gpu_memory", "output", "processes", "disk", "result"]
GOAL_SECONDS = 5.0


def _job(rng: random.Random, n: int, now: float) -> list[dict]:
    """The records of one job: submitted, started, (a violation), job."""
    job_id, tenant = f"{n:012x}", f"tenant{rng.randrange(20)}"
    uid = 60000 + rng.randrange(50)
    who = {"uid": uid, "user": f"user{uid - 60000}", "client_pid": rng.randrange(2, 1 << 22), "host": "node1"}
    submitted = now + rng.random()
    started = submitted + rng.expovariate(1 / 5.0)
    wall = rng.expovariate(1 / 60.0)
    ended = started + wall + 0.1
    verdict = rng.choice(VERDICTS)
    memory = rng.choice((1, 2, 4, 8)) << 30
    arch = rng.choice(("cpu", "cpu", "cpu", "cuda"))
    gpu = (2 << 30) if arch == "cuda" else 0
    job_type = rng.choice(("train", "eval", "sweep", "test", None))
    records = [{"type": "submitted", "job_id": job_id, "tenant": tenant, "ts": submitted, "job_type": job_type, **who},
               {"type": "started", "job_id": job_id, "tenant": tenant, "ts": started, "kernel": "k.py",
                "pid": rng.randrange(2, 1 << 22), "launcher": "forkserver", "labels": {}, **who}]
    if verdict in ("memory", "cpu_time", "wall_time", "gpu_memory"):
        records.append({"type": "violation", "job_id": job_id, "tenant": tenant, "ts": ended - 0.05, "pid": 7,
                        "resource": verdict, "limit": memory, "observed": memory + 1, "action": "kill",
                        "detected_by": "cgroup", **who})
    records.append({"type": "job", "job_id": job_id, "tenant": tenant, "ts": ended, "kernel": "k.py", "arch": arch,
                    "verdict": verdict, "reason": "", "exit_code": 0 if verdict == "ok" else 1, "signal": None,
                    "usage": {"cpu_seconds": wall * rng.random(), "wall_seconds": wall,
                              "peak_rss": memory // 3, "peak_memory": memory // 2, "peak_vms": memory,
                              "peak_processes": 3, "peak_gpu_memory": gpu // 2 or None, "output_bytes": 1200,
                              "peak_disk": None},
                    "labels": {}, "job_type": job_type, "started_at": started,
                    "limits": {"cpu_time": 3600.0, "wall_time": 7200.0, "memory": memory,
                               "gpu_memory": gpu or None, "cpu_threads": 4, "disk": None},
                    "submitted_at": submitted, "reserved": {"memory": memory, "gpu_memory": gpu, "cpu": 4},
                    **who})
    return records


def generate(directory: Path, records: int = 1_000_000, seed: int = 21) -> Path:
    """Write `records` audit records over one year ending now, in FILES files (a job's records may
    straddle two of them, as at a real rotation); returns the live log's path."""
    rng = random.Random(seed)
    log = directory / "audit.jsonl"
    step = YEAR / (records / 3.1)  # about 3.1 records per job

    def stream():
        at = time.time() - YEAR
        for n in itertools.count():
            yield from _job(rng, n, at)
            if rng.random() < 0.02:
                yield {"type": "refused", "ts": at, "reason": "quota_memory", "tenant": "tenant1", "uid": 60001,
                       "user": "user1"}
            if rng.random() < 0.01:
                yield {"type": "alert", "ts": at, "event": "quota_crossed", "tenant": "tenant2"}
            at += step
    produced = stream()
    for index in range(FILES - 1, -1, -1):
        name = log.name + (f".{index}.gz" if index >= 2 else ".1" if index == 1 else "")
        count = records // FILES + (records % FILES if index == 0 else 0)
        batch = [next(produced) for _ in range(count)]
        with (gzip.open if name.endswith(".gz") else open)(directory / name, "wt") as out:
            out.write("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in batch))
        last = batch[-1]["ts"] if batch else time.time()
        os.utime(directory / name, (last, last))  # last written when its last record was, as logrotate leaves it
    return log


def timed_report(log: Path, *args: str) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of the process and its workers) `taichi-sandbox report --json`
    takes over `log` in a fresh process, and its output."""
    began, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run([sys.executable, "-m", "sandbox", "report", "--audit-log", str(log), "--json", *args],
                          capture_output=True, text=True, check=True)
    return time.perf_counter() - began, _children_cpu() - cpu, json.loads(done.stdout)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def report_row(bench) -> None:
    """The `make bench` rows: report over 1M records, wall and CPU time (median of 3 runs)."""
    with tempfile.TemporaryDirectory(prefix="tsbx-bench-audit-") as directory:
        log = generate(Path(directory))
        runs = [timed_report(log)[:2] for _ in range(3)]
        wall, cpu = sorted(r[0] for r in runs), sorted(r[1] for r in runs)
        bench.add("report over 1M audit records in 12 rotated files, wall (s)", wall, wall[1],
                  f"≤ {GOAL_SECONDS:g}", wall[1] <= GOAL_SECONDS, "s")
        bench.add("... its CPU time, all processes (s)", cpu, cpu[1], "report", None, "s")
        week = sorted(timed_report(log, "--since", "7d")[0] for _ in range(3))
        bench.add("... --since 7d (older rotated files not opened), wall (s)", week, week[1], "report", None, "s")


def main() -> None:
    parser = argparse.ArgumentParser(description="time `taichi-sandbox report` over a generated audit log")
    parser.add_argument("--records", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tsbx-bench-audit-") as directory:
        began = time.perf_counter()
        log = generate(Path(directory), args.records)
        size = sum(p.stat().st_size for p in Path(directory).iterdir())
        print(f"generated {args.records} records in {time.perf_counter() - began:.1f} s ({size / 2**20:.0f} MiB on disk)")
        for extra in ((), (), (), ("--since", "7d")):
            seconds, cpu, out = timed_report(log, *extra)
            print(" ".join(extra) or "whole log", end=": ")
            print(f"{seconds:.2f} s ({cpu:.2f} s CPU, load average {os.getloadavg()[0]:.1f}), "
                  f"{out['totals']['jobs']} jobs, {out['totals']['refused']} refused, "
                  f"{out['totals']['skipped_lines']} skipped")


if __name__ == "__main__":
    main()
