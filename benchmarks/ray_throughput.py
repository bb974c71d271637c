"""Bench rows: RayExecutor throughput against Ray tasks running the same kernel.

A local Ray cluster on this machine (loopback, `num_cpus` = the machine's cores). The same batch of
JOBS runs of kernels/tiny.py (a Taichi init, one kernel, one reduction) three ways, one after the
other, each timed from the first submission to the last result:
  plain     a plain Ray task per job (`num_cpus=1`) that runs `python -I kernel.py` — what a Ray user
            does without the sandbox (a Taichi program owns its process);
  submit    `sandbox.ray.submit` per job, `result()` each: sandboxed, lease from the quota authority;
  executor  `RayExecutor.map` of the same JobSpecs.
Rows: executor ÷ plain and executor ÷ submit as throughput ratios (jobs/s over jobs/s), goal ≥ 0.85.
One warm-up batch first (workers, fork-servers and the authority started; Taichi's cache filled).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOBS = 24
GOAL = 0.85
TINY = str(Path(__file__).resolve().parent.parent / "kernels" / "tiny.py")


def _plain(path: str, env: dict) -> int:
    return subprocess.run([sys.executable, "-I", path], capture_output=True, env=env).returncode


def _batches(state: str) -> dict[str, float]:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before Ray is imported: loopback only (tests/conftest.py)
    import ray

    from sandbox import JobSpec, Policy
    from sandbox import ray as sray
    from sandbox.core.limits import Settings
    from sandbox.job.interpreter import base_env
    env = {**base_env(), "HOME": state}
    policy = Policy(settings=Settings(state_dir=state))
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        plain = ray.remote(num_cpus=1)(_plain)
        specs = lambda: [JobSpec(kernel=TINY) for _ in range(JOBS)]  # noqa: E731

        def run_plain() -> None:
            assert ray.get([plain.remote(TINY, env) for _ in range(JOBS)]) == [0] * JOBS

        def run_submit() -> None:
            refs = [sray.submit(spec, policy, quiet=True) for spec in specs()]
            assert all(sray.result(ref).ok for ref in refs)

        def run_executor() -> None:
            with sray.RayExecutor(policy=policy) as ex:
                assert all(r.ok for r in ex.map(specs(), quiet=True))
        ways = {"plain": run_plain, "submit": run_submit, "executor": run_executor}
        for run in ways.values():
            run()  # warm-up
        seconds = {}
        for name, run in ways.items():
            began = time.perf_counter()
            run()
            seconds[name] = time.perf_counter() - began
        return seconds
    finally:
        ray.shutdown()


def ray_throughput(bench) -> None:
    """The `make bench` rows (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="tsbx-bench-ray-") as state:
        seconds = _batches(state)
    for other in ("plain", "submit"):
        ratio = seconds[other] / seconds["executor"]
        bench.add(f"RayExecutor throughput ÷ {'plain Ray tasks (python kernel.py each)' if other == 'plain' else 'sandbox.ray.submit tasks'}"
                  f", {JOBS} tiny.py jobs", None, ratio, f"≥ {GOAL:g}", ratio >= GOAL)
    for name, value in seconds.items():
        bench.add(f"... {name}: {JOBS} jobs (s)", None, value, "report", None, "s")


if __name__ == "__main__":
    for name, value in _batches(tempfile.mkdtemp(prefix="tsbx-bench-ray-")).items():
        print(f"{name}: {JOBS} jobs in {value:.2f} s ({JOBS / value:.1f} jobs/s)")
