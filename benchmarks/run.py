"""Launcher overhead benchmark: one tiny Taichi job, run N times each way, in one run on this machine.

Prints one table (median and p90 wall seconds per job, ratio to plain `python kernel.py`) and writes
benchmarks/results.json. Ways: plain subprocess (no sandbox), exec launcher, fork-server launcher
(warm: the server is started before timing), and the fork-server with monitoring effectively off
(poll interval 1 h, no limits) as the floor the full sandbox is compared with.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sandbox import JobSpec, Limits, Policy, Supervisor
from sandbox.launcher import base_env
from sandbox.limits import Settings

ROOT = Path(__file__).resolve().parent.parent
KERNEL = str(ROOT / "kernels" / "tiny.py")


def timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def plain(home: str) -> None:
    subprocess.run([sys.executable, KERNEL], check=True, capture_output=True, env={**base_env(), "HOME": home})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=15, help="jobs per way")
    args = parser.parse_args()
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as state:
        policy = Policy(settings=Settings(state_dir=state))
        rows["plain python kernel.py"] = timed(lambda: plain(state), args.n)
        for launcher in ("exec", "forkserver"):
            with Supervisor(policy, launcher=launcher, audit_log=Path(state) / "audit.jsonl") as sup:
                sup.run(JobSpec(kernel=KERNEL))  # warm-up: starts the fork-server, fills the kernel cache
                spec = lambda: JobSpec(kernel=KERNEL, limits=Limits(cpu_time="10s", wall_time="20s", memory="1GiB"))
                rows[f"sandbox, {launcher} launcher"] = timed(lambda: sup.run(spec()), args.n)
                if launcher == "forkserver":
                    floor = lambda: JobSpec(kernel=KERNEL, limits=Limits(poll_interval="1h", address_space=None))
                    rows["fork-server, monitoring off (floor)"] = timed(lambda: sup.run(floor()), args.n)
    base = statistics.median(rows["plain python kernel.py"])
    table = Table(title=f"launcher overhead: tiny Taichi CPU job, n={args.n} each "
                        f"({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                        f"Python {platform.python_version()})")
    for column in ("way", "median s", "p90 s", "÷ plain"):
        table.add_column(column, justify="right" if column != "way" else "left")
    results = {}
    for name, samples in rows.items():
        med = statistics.median(samples)
        p90 = sorted(samples)[int(0.9 * (len(samples) - 1))]
        results[name] = {"median": med, "p90": p90, "ratio": med / base}
        table.add_row(name, f"{med:.3f}", f"{p90:.3f}", f"{med / base:.2f}")
    Console().print(table)
    (ROOT / "benchmarks" / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
