"""Run a batch of the bundled kernels as sandboxed Ray tasks on a local Ray cluster; print a table.

    .venv/bin/python examples/ray_batch.py [KERNEL.py ...]      # default: all of them

Starts a 2-CPU local cluster bound to 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray use
loopback on Linux), submits one job per kernel with a limit it should break, and shuts Ray down.
"""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # must precede `import ray`

import ray  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from sandbox import JobSpec, Limits, Policy  # noqa: E402
from sandbox import ray as sandbox_ray  # noqa: E402
from sandbox.core.limits import Settings  # noqa: E402

KERNELS = Path(__file__).resolve().parent.parent / "kernels"
JOBS = {
    "saxpy.py": Limits(),
    "cpu_hog.py": Limits(cpu_time="2s"),
    "memory_hog.py": Limits(memory="512MiB"),
    "sleeper.py": Limits(wall_time="2s"),
    "exception.py": Limits(),
    "spawner.py": Limits(max_processes=5),
}


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in JOBS]
    if unknown:
        sys.exit(f"ray_batch: no such job: {', '.join(unknown)} (choose from {', '.join(JOBS)})")
    jobs = [(name, JOBS[name]) for name in names or JOBS]
    state = tempfile.mkdtemp(prefix="tsbx-ray-demo-")
    os.environ["HOME"] = state  # Ray writes ~/.ray; keep it out of the user's home
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
        policy = Policy(settings=Settings(state_dir=state))
        refs = [(name, sandbox_ray.submit(JobSpec(kernel=str(KERNELS / name), limits=limits), policy))
                for name, limits in jobs]
        table = Table(title=f"sandboxed jobs on Ray (nodes at {', '.join(sorted(addresses))})")
        for column in ("kernel", "verdict", "wall s", "ray node", "ray resources", "reason"):
            table.add_column(column)
        for name, ref in refs:
            r = sandbox_ray.result(ref)
            table.add_row(name, r.verdict.value, f"{r.usage.wall_seconds:.2f}", r.labels["ray_node_id"][:12],
                          r.labels["ray_resources"], r.reason)
        console = Console()
        (console if console.is_terminal else Console(width=160)).print(table)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
