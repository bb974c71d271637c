"""A GPU job under a GPU memory limit, and how each limit was enforced for it.

Runs kernels/heat_stencil.py:simulate with arch="gpu" (CUDA where there is one, else Vulkan, e.g.
Mesa lavapipe on a CPU-only machine) and gpu_memory=512MiB, then prints the verdict, the result and
the enforcement report: which caps were hard, which only watched, and which unavailable here.
Where no GPU arch initialises, it says why and runs the same job on the CPU instead.

    .venv/bin/python examples/gpu_job.py [N STEPS]      # grid size and steps, default 512 200
"""

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sandbox import Limits, run_kernel

KERNEL = str(Path(__file__).resolve().parent.parent / "kernels" / "heat_stencil.py") + ":simulate"


def main(n: int = 512, steps: int = 200) -> None:
    limits = Limits(gpu_memory="512MiB", memory="2GiB", wall_time="120s", cpu_time="120s")
    r = run_kernel(KERNEL, arch="gpu", kwargs={"n": n, "steps": steps}, limits=limits)
    console = Console()
    if r.verdict.value == "rejected":
        console.print(f"no GPU arch here ({r.reason}): running on cpu instead", highlight=False)
        r = run_kernel(KERNEL, arch="cpu", kwargs={"n": n, "steps": steps}, limits=limits)
    console.print(f"verdict: {r.verdict.value} {r.reason}  arch: {r.arch}  result: {r.return_value}",
                  highlight=False)
    console.print("; ".join(r.notes), style="dim", highlight=False)
    table = Table(title="how each limit was enforced for this job")
    for column in ("limit", "level", "by", "note"):
        table.add_column(column)
    for name, e in r.enforcement.items():
        table.add_row(name, e.level, e.by, e.note)
    console.print(table)


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
