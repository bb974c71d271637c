"""How a JobResult looks to people: the CLI summary, `__rich__` and `_repr_html_` (notebooks).

All three show the same things: the verdict and its reason, warnings (an arch the job asked for but
did not get), what enforced its limits (`enforced`), usage against each limit, violations, how the
job was ended, copied outputs, and for a failed job the tail of its traceback or stderr. `models`
imports this module (lazily), never the other way: "JobResult" in the annotations names
`sandbox.core.models.JobResult`.
"""

from __future__ import annotations

import html
import os

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .limits import Limits
from .units import duration

VERDICT_STYLE = {"ok": "bold green", "error": "bold red", "crashed": "bold red", "rejected": "bold yellow"}
VERDICT_COLOUR = {"ok": "#1a7f37", "error": "#cf222e", "crashed": "#cf222e", "rejected": "#9a6700"}
SIZE_RESOURCES = ("memory", "address_space", "output", "gpu_memory", "disk")
TAIL_LINES = 15


def size(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def usage_rows(limits: Limits, cpu: float, wall: float, rss: int, vms: int, procs: int, output: int,
               disk: int | None = None):
    """(resource, used, limit) rows, as text."""
    yield "cpu time", duration(cpu), duration(limits.cpu_time)
    yield "wall time", duration(wall), duration(limits.wall_time)
    yield "memory (RSS, tree)", size(rss), size(limits.memory)
    yield "virtual memory", size(vms), "auto" if limits.address_space == "auto" else size(limits.address_space)
    yield "processes", str(procs), "-" if limits.max_processes is None else str(limits.max_processes)
    yield "output", size(output), size(limits.max_output)
    if limits.disk is not None:
        yield "disk", size(disk), size(limits.disk)


def _result_rows(result: "JobResult"):
    u = result.usage
    return usage_rows(result.limits, u.cpu_seconds, u.wall_seconds, u.peak_rss, u.peak_vms, u.peak_processes,
                      u.output_bytes, u.peak_disk)


def _violation_rows(result: "JobResult"):
    """(resource, limit, observed, action, detected by, pid) per violation, as text."""
    for v in result.violations:
        fmt = size if v.resource in SIZE_RESOURCES else duration if v.resource.endswith("_time") else (lambda x: f"{x:g}")
        yield v.resource, fmt(v.limit), fmt(v.observed), v.action, v.detected_by, str(v.pid)


def _termination(result: "JobResult") -> str | None:
    t = result.termination
    if t is None:
        return None
    grace = f", SIGKILL {duration(t.sigkill_at - t.sigterm_at)} after SIGTERM" if t.sigterm_at and t.sigkill_at else ""
    return f"terminated: {'SIGTERM' if t.sigterm_at else 'SIGKILL'} to the process tree{grace}"


def _tail(result: "JobResult", stderr: bool = True) -> str:
    """The end of a failed job's traceback (none for a plain sys.exit), else of its stderr."""
    if result.ok:
        return ""
    traceback = result.traceback if result.error_type != "SystemExit" else None
    text = traceback or (result.stderr_tail if stderr else "")
    return "\n".join(text.strip().splitlines()[-TAIL_LINES:])


def warnings(result: "JobResult") -> list[str]:
    """The notes a person should not miss (they start with 'WARNING')."""
    return [n for n in result.notes if n.startswith("WARNING")]


def summary(result: "JobResult", stderr_tail: bool = True) -> Group:
    """The rich renderable of a result (the CLI summary and `JobResult.__rich__`); `stderr_tail`
    False where the job's stderr was already shown live."""
    parts: list = [Text.assemble(("verdict: ", "bold"), (result.verdict.value,
                                                        VERDICT_STYLE.get(result.verdict.value, "bold magenta")),
                                 (f"  {result.reason}" if result.reason else "", ""))]
    parts += [Text(w, style="bold yellow") for w in warnings(result)]
    if result.enforced:
        parts.append(Text(result.enforced, style="dim"))
    table = Table(show_header=True, title=f"job {result.job_id} · {result.kernel} · arch {result.arch}")
    for column in ("resource", "used (peak)", "limit"):
        table.add_column(column)
    for row in _result_rows(result):
        table.add_row(*row)
    parts.append(table)
    if result.violations:
        vt = Table(title="violations", show_header=True)
        for column in ("resource", "limit", "observed", "action", "detected by", "pid"):
            vt.add_column(column)
        for row in _violation_rows(result):
            vt.add_row(*row)
        parts.append(vt)
    termination = _termination(result)
    if termination:
        parts.append(Text(termination))
    if result.outputs:
        parts.append(Text(f"outputs: {len(result.outputs)} file(s) copied to "
                          f"{os.path.commonpath([os.path.dirname(p) for p in result.outputs])}"))
    tail = _tail(result, stderr_tail)
    if tail:
        parts.append(Text(tail, style="dim"))
    return Group(*parts)


def _html_table(title: str, header: tuple[str, ...], rows) -> str:
    cells = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return (f"<table><caption style='text-align:left'>{html.escape(title)}</caption>"
            f"<thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>")


def to_html(result: "JobResult") -> str:
    """`JobResult._repr_html_`: the summary as HTML (every value escaped)."""
    verdict = result.verdict.value
    colour = VERDICT_COLOUR.get(verdict, "#8250df")
    parts = [f"<div class='taichi-sandbox-result'><p><b>verdict:</b> "
             f"<b style='color:{colour}'>{html.escape(verdict)}</b> {html.escape(result.reason)}</p>"]
    parts += [f"<p style='color:#9a6700'><b>{html.escape(w)}</b></p>" for w in warnings(result)]
    if result.enforced:
        parts.append(f"<p style='color:#57606a'>{html.escape(result.enforced)}</p>")
    parts.append(_html_table(f"job {result.job_id} · {result.kernel} · arch {result.arch}",
                             ("resource", "used (peak)", "limit"), _result_rows(result)))
    if result.violations:
        parts.append(_html_table("violations", ("resource", "limit", "observed", "action", "detected by", "pid"),
                                 _violation_rows(result)))
    termination = _termination(result)
    if termination:
        parts.append(f"<p>{html.escape(termination)}</p>")
    if result.outputs:
        items = "".join(f"<li><code>{html.escape(p)}</code></li>" for p in result.outputs[:20])
        more = f"<li>… {len(result.outputs) - 20} more</li>" if len(result.outputs) > 20 else ""
        parts.append(f"<p>outputs:</p><ul>{items}{more}</ul>")
    if _tail(result):
        parts.append(f"<pre>{html.escape(_tail(result))}</pre>")
    return "".join(parts) + "</div>"
