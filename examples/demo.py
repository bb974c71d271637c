"""`make demo`: run the bundled kernels through the taichi-sandbox CLI and show their verdicts.

One job is shown in full (the CLI's own summary); then every bundled kernel runs with a limit it is
meant to break, and a table shows verdict, exit code and reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
JOBS = [
    ("saxpy.py", []),
    ("reduction.py", ["--entry", "sum_of_squares", "--", "1000"]),
    ("cpu_hog.py", ["--cpu-time", "2s"]),
    ("memory_hog.py", ["--memory", "512MiB"]),
    ("sleeper.py", ["--wall-time", "2s"]),
    ("sigterm_ignorer.py", ["--wall-time", "2s", "--grace", "1s"]),
    ("spawner.py", ["--max-processes", "5"]),
    ("output_flood.py", ["--max-output", "8MiB"]),
    ("disk_filler.py", ["--disk", "64MiB"]),
    ("exception.py", []),
    ("segfault.py", []),
    ("escape_init.py", ["--gpu-memory", "1GiB"]),
]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandbox", *args], capture_output=True, text=True, cwd=ROOT)


def main() -> None:
    console = Console() if Console().is_terminal else Console(width=170)
    console.rule("taichi-sandbox run kernels/cpu_hog.py --cpu-time 2s")
    shown = cli("run", "kernels/cpu_hog.py", "--cpu-time", "2s")
    console.print(shown.stdout, end="", highlight=False, markup=False)
    console.print(f"exit code {shown.returncode}\n")

    table = Table(title="bundled kernels under the sandbox")
    for column in ("kernel", "limits", "verdict", "exit", "cpu s", "wall s", "peak RSS MiB"):
        table.add_column(column, no_wrap=True)
    table.add_column("reason")
    for name, args in JOBS:
        console.print(f"running kernels/{name} {' '.join(args)} ...", style="dim")
        p = cli("run", f"kernels/{name}", "--json", *args)
        try:
            r = json.loads(p.stdout)
        except ValueError:
            table.add_row(name, " ".join(args), "[red]no result[/]", str(p.returncode), "", "", "", p.stderr[-200:])
            continue
        style = "green" if r["verdict"] == "ok" else "yellow" if r["verdict"] in ("error", "crashed") else "red"
        u = r["usage"]
        reason = r["reason"] or (f"returned {r['return_value']}" if r["return_value"] is not None else "")
        if r["ti_init"] and r["ti_init"][0]["clamped"]:
            reason = (reason + " clamped: " + ", ".join(r["ti_init"][0]["clamped"])).strip()
        table.add_row(name, " ".join(a for a in args if a != "--"), f"[{style}]{r['verdict']}[/]", str(p.returncode),
                      f"{u['cpu_seconds']:.2f}", f"{u['wall_seconds']:.2f}", f"{u['peak_rss'] / 2**20:.0f}", reason)
    console.print(table)


if __name__ == "__main__":
    main()
