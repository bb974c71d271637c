"""`make demo`: run the bundled kernels through the taichi-sandbox CLI and show their verdicts.

Every bundled kernel runs with a limit it is meant to break; each job's verdict summary is printed
as `taichi-sandbox run` prints it (sandbox.core.display), then a table sums them up: verdict, exit code,
usage and reason. The jobs run from a temporary directory, so the files they leave (disk_filler.py
writes until its disk limit stops it) are copied back there, not into your checkout.

    .venv/bin/python examples/demo.py [KERNEL.py ...]    # default: all of them
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sandbox import JobResult
from sandbox.core.display import summary

ROOT = Path(__file__).resolve().parent.parent
JOBS = {
    "saxpy.py": [],
    "reduction.py": ["--entry", "sum_of_squares", "--", "1000"],
    "cpu_hog.py": ["--cpu-time", "2s"],
    "memory_hog.py": ["--memory", "512MiB"],
    "sleeper.py": ["--wall-time", "2s"],
    "sigterm_ignorer.py": ["--wall-time", "2s", "--grace", "1s"],
    "spawner.py": ["--max-processes", "5"],
    "output_flood.py": ["--max-output", "8MiB"],
    "disk_filler.py": ["--disk", "64MiB"],
    "exception.py": [],
    "segfault.py": [],
    "escape_init.py": ["--gpu-memory", "1GiB"],
}


def run(name: str, args: list[str], cwd: str, console: Console) -> tuple[subprocess.CompletedProcess, JobResult | None]:
    """One job through the CLI, from `cwd` (--json, so the result can be tabled too); its summary printed."""
    console.rule(" ".join(["taichi-sandbox run", f"kernels/{name}", *args]))
    # --json precedes the kernel's own `--` arguments, which must stay last
    env = dict(os.environ)
    if env.get("TAICHI_SANDBOX_LIMITS"):  # `make demo` names it relative to the checkout, not to `cwd`
        env["TAICHI_SANDBOX_LIMITS"] = os.path.abspath(env["TAICHI_SANDBOX_LIMITS"])
    p = subprocess.run([sys.executable, "-m", "sandbox", "run", "--json", str(ROOT / "kernels" / name), *args],
                       capture_output=True, text=True, cwd=cwd, env=env)
    try:
        result = JobResult.model_validate_json(p.stdout)
    except ValueError:
        console.print(f"no result (exit {p.returncode}): {p.stderr[-400:]}", style="red", markup=False)
        return p, None
    console.print(summary(result))
    console.print(f"exit code {p.returncode}\n", style="dim")
    return p, result


def main(names: list[str]) -> None:
    unknown = [n for n in names if n not in JOBS]
    if unknown:
        sys.exit(f"demo: no such demo job: {', '.join(unknown)} (choose from {', '.join(JOBS)})")
    console = Console() if Console().is_terminal else Console(width=170)
    table = Table(title="bundled kernels under the sandbox")
    for column in ("kernel", "limits", "verdict", "exit", "cpu s", "wall s", "peak RSS MiB"):
        table.add_column(column, no_wrap=True)
    table.add_column("reason")
    with tempfile.TemporaryDirectory(prefix="taichi-sandbox-demo-") as cwd:
        for name in names or list(JOBS):
            _row(table, name, *run(name, JOBS[name], cwd, console))
    console.print(table)


def _row(table: Table, name: str, p: subprocess.CompletedProcess, r: JobResult | None) -> None:
    """The job's line in the closing table."""
    shown_args = " ".join(a for a in JOBS[name] if a != "--")
    if r is None:
        table.add_row(name, shown_args, "[red]no result[/]", str(p.returncode), "", "", "", p.stderr[-200:])
        return
    verdict = r.verdict.value
    style = "green" if verdict == "ok" else "yellow" if verdict in ("error", "crashed") else "red"
    reason = r.reason or (f"returned {r.return_value}" if r.return_value is not None else "")
    if r.ti_init and r.ti_init[0].get("clamped"):
        reason = (reason + " clamped: " + ", ".join(r.ti_init[0]["clamped"])).strip()
    u = r.usage
    table.add_row(name, shown_args, f"[{style}]{verdict}[/]", str(p.returncode), f"{u.cpu_seconds:.2f}",
                  f"{u.wall_seconds:.2f}", f"{u.peak_rss / 2**20:.0f}", reason)


if __name__ == "__main__":
    main(sys.argv[1:])
