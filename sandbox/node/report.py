"""`taichi-sandbox report`: the accounting of sandbox.node.accounting as a table, JSON or CSV.

Who sees what: root every record; anyone else only the records of their own uid, in the logs they
can read (a non-root user's own log, or one an operator made readable); the node's log is root's
(0600), so there they get a one-line error naming it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from datetime import datetime
from pathlib import Path

from ..core.units import _TIME_UNITS, _split
from .accounting import KEYS, Report
from .auditscan import account

AGO_UNITS = {**_TIME_UNITS, "d": 86400.0, "w": 7 * 86400.0}
COLUMNS = ("jobs", "cpu_seconds", "wall_seconds", "reserved_memory_gib_hours", "peak_memory_bytes",
           "gpu_memory_gib_hours", "preemptions", "refused", "queue_wait_mean_seconds", "queue_wait_p95_seconds",
           "violations")


def moment(value: str, now: float, option: str) -> float:
    """Epoch seconds from a duration ago ("7d", "12h", "30m", "90s", "2w") or an ISO 8601 date or
    time ("2026-12-01", "2026-12-01T08:00", with an offset or in local time). ValueError names `option`."""
    try:
        number, scale = _split(value, AGO_UNITS)
        if value.strip()[-1:].isalpha():
            return now - number * scale
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value.strip()).timestamp()
    except (ValueError, OverflowError, OSError):  # not a date, or one the platform cannot place
        raise ValueError(f"{option} {value!r}: expected a duration ago (7d, 12h, 30m, 90s, 2w) or an ISO date "
                         "(2026-12-01, 2026-12-01T08:00)") from None


def build(path: Path, by: str, since: str | None, until: str | None) -> Report:
    """The report for the CLI's arguments (ValueError for bad ones; AccountingError for the log)."""
    if by not in KEYS:
        raise ValueError(f"--by {by!r}: expected one of {', '.join(KEYS)}")
    now = time.time()
    start = moment(since, now, "--since") if since is not None else None
    end = moment(until, now, "--until") if until is not None else None
    if start is not None and end is not None and start >= end:
        raise ValueError("--since must be before --until")
    return account(path, by, start, end, None if os.geteuid() == 0 else os.geteuid())


def rows(report: Report) -> list[tuple[str, dict]]:
    """(group, its numbers) per group, largest CPU use first."""
    groups = sorted(report.groups.items(), key=lambda item: (-(item[1].cpu_seconds or 0), item[0]))
    return [(name, group.as_dict()) for name, group in groups]


def to_json(report: Report) -> str:
    totals = report.totals().as_dict()
    return json.dumps({"by": report.by, "groups": [{report.by: name, **numbers} for name, numbers in rows(report)],
                       "totals": {**totals, "unfinished": report.unfinished, "skipped_lines": report.skipped_lines},
                       "files": report.files, "problems": report.problems}, indent=2) + "\n"


def to_csv(report: Report) -> str:
    """Header and one row per group (RFC 4180); a column per violated resource; no unit conversions."""
    resources = sorted({r for group in report.groups.values() for r in group.violations})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow([report.by, *COLUMNS, *(f"violations_{r}" for r in resources)])
    for name, n in rows(report):
        writer.writerow([name, *(_flat(n)[c] for c in COLUMNS), *(n["violations"].get(r, 0) for r in resources)])
    return out.getvalue()


def _flat(numbers: dict) -> dict:
    """A group's numbers as CSV cells: unknown is empty."""
    wait = numbers["queue_wait"]
    flat = {**numbers, "queue_wait_mean_seconds": wait["mean_seconds"], "queue_wait_p95_seconds": wait["p95_seconds"],
            "violations": sum(numbers["violations"].values())}
    return {k: "" if v is None else v for k, v in flat.items()}


def duration(seconds: float | None) -> str:
    """Seconds for people: 42.0s, 12.5m, 3.2h, 4.1d."""
    if seconds is None:
        return "-"
    for unit, scale in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if seconds >= 2 * scale:
            return f"{seconds / scale:.1f}{unit}"
    return f"{seconds:.1f}s"


def table(report: Report, title: str):
    """A rich Table: a row per group, then the totals, then violations by resource; `*`: summed
    over the jobs whose records have the value (older records lack some)."""
    from rich import box
    from rich.table import Table

    from ..core.display import size
    totals = report.totals().as_dict()
    grid = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False,
                 caption="* some jobs' records lack this value (older records): summed over the others"
                 if totals["unknown"] else None)
    for column in (report.by, "jobs", "CPU", "wall", "mem GiB·h", "peak mem", "GPU GiB·h", "violations",
                   "preempted", "refused", "wait", "wait p95"):
        grid.add_column(column, justify="left" if column == report.by else "right", no_wrap=True)

    def cells(name: str, n: dict) -> list[str]:
        def shown(key: str, fmt) -> str:
            value, unknown = n[key], n["unknown"].get(key.removesuffix("_bytes"))
            if value is None:
                return "unknown" if unknown else "-"
            return fmt(value) + ("*" if unknown else "")
        wait = n["queue_wait"]
        return [name, str(n["jobs"]), shown("cpu_seconds", duration), shown("wall_seconds", duration),
                shown("reserved_memory_gib_hours", "{:.1f}".format), shown("peak_memory_bytes", size),
                shown("gpu_memory_gib_hours", "{:.1f}".format), str(sum(n["violations"].values())),
                str(n["preemptions"]), str(n["refused"]), duration(wait["mean_seconds"]),
                duration(wait["p95_seconds"])]
    for name, numbers in rows(report):
        grid.add_row(*cells(name, numbers))
    grid.add_section()
    grid.add_row(*cells("total", totals), style="bold")
    if not totals["violations"]:
        return grid
    resources = Table(title="violations by resource", box=box.SIMPLE_HEAD, pad_edge=False)
    resources.add_column(report.by, no_wrap=True)
    names = list(totals["violations"])
    for resource in names:
        resources.add_column(resource, justify="right")
    for name, numbers in rows(report):
        resources.add_row(name, *(str(numbers["violations"].get(r, 0)) for r in names))
    from rich.console import Group as Stack
    return Stack(grid, resources)
