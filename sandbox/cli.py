"""`taichi-sandbox`: run kernel files under limits, run batches, list profiles, check a limits.toml,
probe the machine, show quota usage.

Exit codes (see README): the verdict's code for `run` (0 ok, 1 error, 3 rejected, 4 crashed,
118-124 one per limit, 124 = wall time as in timeout(1)); 2 usage/config error; 125 internal error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.live import Live
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from .client import entry_args as _parse_entry_args
from .limits import ConfigError, Limits, Policy, load_policy, read_file, tomllib
from .models import EXIT_INTERNAL, EXIT_USAGE, JobResult, JobSpec, Sample, Verdict
from .supervisor import Supervisor

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run Taichi kernel jobs in supervised, resource-limited child processes.")
err = Console(stderr=True)

VERDICT_STYLE = {Verdict.ok: "bold green", Verdict.error: "bold red", Verdict.crashed: "bold red",
                 Verdict.rejected: "bold yellow"}


def _fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    err.print(f"taichi-sandbox: error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _usage_rows(limits: Limits, cpu: float, wall: float, rss: int, vms: int, procs: int, output: int):
    yield "cpu time", _secs(cpu), _secs(limits.cpu_time)
    yield "wall time", _secs(wall), _secs(limits.wall_time)
    yield "memory (RSS, tree)", _size(rss), _size(limits.memory)
    yield "virtual memory", _size(vms), "auto" if limits.address_space == "auto" else _size(limits.address_space)
    yield "processes", str(procs), "-" if limits.max_processes is None else str(limits.max_processes)
    yield "output", _size(output), _size(limits.max_output)


def _live_table(kernel: str, limits: Limits, sample: Sample | None) -> Table:
    table = Table(title=f"running {kernel}", show_header=True)
    for column in ("resource", "used", "limit"):
        table.add_column(column)
    if sample is not None:
        for row in _usage_rows(limits, sample.cpu, sample.t, sample.rss, sample.vms, sample.processes,
                               sample.output):
            table.add_row(*row)
    return table


def render_summary(result: JobResult, console: Console) -> None:
    """Verdict, usage against each limit, violations, and the tail of stderr / the traceback."""
    style = VERDICT_STYLE.get(result.verdict, "bold magenta")
    console.print(Text.assemble(("verdict: ", "bold"), (result.verdict.value, style),
                                (f"  {result.reason}" if result.reason else "", "")))
    u = result.usage
    table = Table(show_header=True, title=f"job {result.job_id} · {result.kernel} · arch {result.arch}")
    for column in ("resource", "used (peak)", "limit"):
        table.add_column(column)
    for row in _usage_rows(result.limits, u.cpu_seconds, u.wall_seconds, u.peak_rss, u.peak_vms,
                           u.peak_processes, u.output_bytes):
        table.add_row(*row)
    console.print(table)
    if result.violations:
        vt = Table(title="violations", show_header=True)
        for column in ("resource", "limit", "observed", "action", "detected by", "pid"):
            vt.add_column(column)
        for v in result.violations:
            fmt = _size if v.resource in ("memory", "address_space", "output", "gpu_memory") else (
                _secs if v.resource.endswith("_time") else (lambda x: f"{x:g}"))
            vt.add_row(v.resource, fmt(v.limit), fmt(v.observed), v.action, v.detected_by, str(v.pid))
        console.print(vt)
    if result.termination is not None:
        t = result.termination
        grace = (f", SIGKILL {t.sigkill_at - t.sigterm_at:.2f}s after SIGTERM"
                 if t.sigterm_at and t.sigkill_at else "")
        sent = "SIGTERM" if t.sigterm_at else "SIGKILL"
        console.print(f"terminated: {sent} to the process tree{grace}", highlight=False)
    if result.verdict is not Verdict.ok:
        tail = (result.traceback or result.stderr_tail).strip().splitlines()[-15:]
        if tail:
            console.print(Text("\n".join(tail), style="dim"))


@app.command()
def run(
    file: str = typer.Argument(..., help="Taichi script to run (as __main__), or FILE:FUNCTION."),
    extra: Optional[List[str]] = typer.Argument(None, help="After --: script argv, or JSON args for --entry."),
    entry: Optional[str] = typer.Option(None, help="Function in FILE to call with the extra args (JSON)."),
    arch: str = typer.Option("cpu", help="cpu | vulkan | cuda | opengl | metal | gpu"),
    profile: Optional[str] = typer.Option(None, help="Profile from the limits file."),
    tenant: Optional[str] = typer.Option(None, help="Tenant from the limits file."),
    limits_file: Optional[Path] = typer.Option(None, help="limits.toml (default: $TAICHI_SANDBOX_LIMITS or ./limits.toml)."),
    cpu_time: Optional[str] = typer.Option(None, help="e.g. 2s, 1.5, 500ms"),
    wall_time: Optional[str] = typer.Option(None, help="e.g. 10s, 2m"),
    memory: Optional[str] = typer.Option(None, help="memory of the whole job (its cgroup; RSS without one), e.g. 1GiB"),
    address_space: Optional[str] = typer.Option(None, help="RLIMIT_AS: auto | SIZE | unlimited"),
    gpu_memory: Optional[str] = typer.Option(None, help="bytes (e.g. 2GiB) or fraction (e.g. 50%)"),
    max_processes: Optional[int] = typer.Option(None, help="processes in the job tree"),
    max_output: Optional[str] = typer.Option(None, help="stdout+stderr bytes, e.g. 10MiB"),
    grace: Optional[str] = typer.Option(None, help="SIGTERM -> SIGKILL delay, e.g. 2s"),
    launcher: Optional[str] = typer.Option(None, help="forkserver | exec"),
    as_json: bool = typer.Option(False, "--json", help="Print the JobResult as JSON, nothing else."),
) -> None:
    """Run one Taichi job and print its verdict."""
    overrides = {k: v for k, v in dict(cpu_time=cpu_time, wall_time=wall_time, memory=memory,
                                        address_space=address_space, gpu_memory=gpu_memory,
                                        max_processes=max_processes, max_output=max_output,
                                        grace=grace).items() if v is not None}
    extra = extra or []
    try:
        limits = Limits.parse(overrides, "command line")
        policy = load_policy(limits_file)
        kernel = f"{file}:{entry}" if entry else file
        target = kernel.rsplit(":", 1)[0] if ":" in kernel else kernel
        if target.endswith(".py") and not Path(target).is_file():
            raise ConfigError(f"kernel file not found: {target}")
        spec = JobSpec(kernel=kernel, arch=arch, limits=limits, profile=profile, tenant=tenant,
                       args=_parse_entry_args(extra) if ":" in kernel else [],
                       argv=[] if ":" in kernel else extra)
        effective = policy.resolve(profile, tenant, limits)
        if launcher is not None and launcher not in ("forkserver", "exec"):
            raise ConfigError(f"launcher={launcher!r}: expected forkserver or exec")
    except ConfigError as e:
        raise _fail(str(e))
    out = Console()
    live_view = out.is_terminal and not as_json
    try:
        with Supervisor(policy, launcher=launcher) as supervisor:
            if live_view:
                with Live(_live_table(kernel, effective, None), console=out, refresh_per_second=8,
                          transient=True) as live:
                    result = supervisor.run(spec, on_sample=lambda s: live.update(
                        _live_table(kernel, effective, s)))
            else:
                result = supervisor.run(spec)
    except Exception as e:  # noqa: BLE001 - the sandbox itself failed, not the job
        raise _fail(f"internal error: {type(e).__name__}: {e}", EXIT_INTERNAL)
    if as_json:
        sys.stdout.write(result.model_dump_json() + "\n")
    else:
        render_summary(result, out)
    raise typer.Exit(result.exit_status)


@app.command()
def profiles(limits_file: Optional[Path] = typer.Option(None, help="limits.toml to read.")) -> None:
    """List the profiles of a limits file with their effective limits."""
    try:
        policy = load_policy(limits_file)
    except ConfigError as e:
        raise _fail(str(e))
    table = Table(title=f"profiles in {policy.source}")
    columns = {"[defaults]": policy.defaults, **policy.profiles}
    table.add_column("limit")
    for name in columns:
        table.add_column(name)
    for field in Limits.model_fields:
        table.add_row(field, *[_show(getattr(limits, field), field) for limits in columns.values()])
    Console().print(table)


def _show(value, name: str) -> str:
    if value is None:
        return "-"
    if name in ("memory", "max_output", "max_file_size") or (name in ("address_space", "gpu_memory")
                                                              and isinstance(value, int)):
        return _size(value)
    if name in ("cpu_time", "wall_time", "grace", "poll_interval"):
        return _secs(value)
    return str(value)


@app.command()
def check(path: Path = typer.Argument(..., help="limits.toml to validate.")) -> None:
    """Validate a limits file; exit 0 when valid, 2 with a one-line error otherwise."""
    try:
        policy = Policy.load(path)
    except ConfigError as e:
        raise _fail(str(e))
    Console().print(f"{path}: ok ({len(policy.profiles)} profiles, {len(policy.tenants)} tenants)",
                    highlight=False)


def _manifest(path: Path) -> list[dict]:
    """[[job]] tables of a jobs.toml, each a JobSpec's fields (kernel, arch, tenant, limits, ...)."""
    data = read_file(path, "manifest", tomllib.loads)
    jobs = data.get("job")
    if set(data) != {"job"} or not isinstance(jobs, list) or not all(isinstance(j, dict) for j in jobs):
        raise ConfigError(f"{path}: expected only [[job]] tables")
    return jobs


@app.command()
def batch(
    files: Optional[List[str]] = typer.Argument(None, help="Kernel files (or FILE:FUNCTION) to run."),
    manifest: Optional[Path] = typer.Option(None, help="jobs.toml with [[job]] tables (kernel, arch, tenant, "
                                                      "profile, job_type, priority, args, kwargs, [job.limits])."),
    concurrency: Optional[int] = typer.Option(None, min=1, help="Jobs at once (default: node CPU slots)."),
    tenant: Optional[str] = typer.Option(None, help="Tenant for jobs that do not name one."),
    profile: Optional[str] = typer.Option(None, help="Profile for jobs that do not name one."),
    arch: str = typer.Option("cpu", help="Arch for jobs that do not name one."),
    limits_file: Optional[Path] = typer.Option(None, help="limits.toml (default: $TAICHI_SANDBOX_LIMITS or ./limits.toml)."),
    metrics_port: Optional[int] = typer.Option(None, help="Serve Prometheus /metrics on 127.0.0.1:PORT."),
    metrics_textfile: Optional[Path] = typer.Option(None, help="Write Prometheus metrics to this file at the end."),
    as_json: bool = typer.Option(False, "--json", help="One JobResult JSON per line, nothing else."),
) -> None:
    """Run many jobs through the executor (admission control, quotas, priorities); exit 0 when all
    are ok, 1 otherwise."""
    try:
        policy = load_policy(limits_file)
        entries = _manifest(manifest) if manifest else []
        entries += [{"kernel": f} for f in files or []]
        if not entries:
            raise ConfigError("no jobs: give kernel files or --manifest")
        specs = []
        for number, entry in enumerate(entries, 1):
            entry = {"arch": arch, "tenant": tenant, "profile": profile, **entry}
            spec = JobSpec.parse(entry, f"job {number}")
            target = spec.target()[0]
            if (spec.target()[1] is None or target.endswith(".py")) and not Path(target).is_file():
                raise ConfigError(f"job {number}: kernel file not found: {target}")
            policy.resolve(spec.profile, spec.tenant, spec.limits, spec.job_type)
            specs.append(spec)
    except ConfigError as e:
        raise _fail(str(e))
    from .executor import SandboxExecutor  # imported here: `run` should not pay for prometheus-client

    out = Console()
    with SandboxExecutor(max_concurrent=concurrency, policy=policy) as executor:
        if metrics_port is not None:
            executor.metrics.serve(metrics_port)
        futures = [executor.submit(spec, block=True) for spec in specs]
        if out.is_terminal and not as_json:
            with Progress(*Progress.get_default_columns(), console=out, transient=True) as progress:
                task = progress.add_task("jobs", total=len(futures))
                for future in futures:
                    future.add_done_callback(lambda _: progress.advance(task))
                results = [f.result() for f in futures]
        else:
            results = [f.result() for f in futures]
        if metrics_textfile is not None:
            executor.metrics.write_textfile(str(metrics_textfile))
    if as_json:
        for result in results:
            sys.stdout.write(result.model_dump_json() + "\n")
    else:
        table = Table(title=f"{len(results)} jobs")
        for column in ("job", "kernel", "tenant", "verdict", "exit", "wall s", "reason"):
            table.add_column(column)
        for spec, r in zip(specs, results):
            table.add_row(r.job_id, spec.kernel, spec.tenant or "-",
                          Text(r.verdict.value, VERDICT_STYLE.get(r.verdict, "bold magenta")),
                          str(r.exit_status), f"{r.usage.wall_seconds:.2f}", r.reason)
        out.print(table)
    raise typer.Exit(0 if all(r.verdict is Verdict.ok for r in results) else 1)


@app.command()
def quota(state: Optional[Path] = typer.Option(None, help="quota.json written by a running executor "
                                                           "(default: <state_dir>/quota.json)."),
          limits_file: Optional[Path] = typer.Option(None, help="limits.toml, for its state_dir."),
          as_json: bool = typer.Option(False, "--json", help="Print the state as JSON.")) -> None:
    """Tenants' usage against their quotas, from the executor's state file."""
    try:
        path = state or load_policy(limits_file).settings.resolved_state_dir() / "quota.json"
        data = read_file(path, "quota state (written by a running executor)", json.loads)
    except ConfigError as e:
        raise _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
        return
    table = Table(title=f"quota usage ({path})")
    for column in ("tenant", "running", "queued", "concurrency", "memory", "gpu memory", "rejections", "violations"):
        table.add_column(column)

    def used(entry: dict, fmt) -> str:
        quota_value = entry["quota"]
        return f"{fmt(entry['used'])} / {fmt(quota_value) if quota_value else '-'}"
    for name, t in data["tenants"].items():
        table.add_row(name, str(t["running"]), str(t["queued"]), used(t["concurrency"], str),
                      used(t["memory"], _size), used(t["gpu_memory"], _size), str(t["rejections"]),
                      str(t["violations"]))
    Console().print(table)


LEVEL_STYLE = {"hard": "green", "watched": "cyan", "unavailable": "red", "off": "dim"}


@app.command()
def probe(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """What this machine can enforce: archs that initialise, NVML, MPS, cgroups, and per arch
    whether each limit is hard, watched or unavailable (with the reason)."""
    from .enforcement import machine_report
    from .gpu import NvmlSampler

    report = machine_report(NvmlSampler())
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    out = Console()
    out.print(f"Taichi {report['taichi']}", highlight=False)
    archs = Table(title="archs")
    for column in ("arch", "usable", "detail"):
        archs.add_column(column)
    for arch, found in report["archs"].items():
        archs.add_row(arch, "[green]yes[/]" if found["usable"] else "[red]no[/]", found["detail"])
    out.print(archs)
    nvml = report["nvml"]
    if nvml["available"]:
        out.print(f"NVML: driver {nvml['driver']}", highlight=False)
        for d in nvml["devices"]:
            out.print(f"  GPU {d['index']}: {d['name']} {_size(d['memory_total'])} {d['uuid']}", highlight=False)
    else:
        out.print(f"NVML: unavailable ({nvml['reason']})", highlight=False)
    mps = report["mps"]
    out.print(f"MPS: {'reachable at ' + mps['pipe_directory'] if mps['reachable'] else 'no control daemon'}",
              highlight=False)
    cg = report["cgroups"]
    out.print(f"cgroups: {cg['mechanism']} ({', '.join(cg['enforces']) or 'nothing'} enforced by the kernel; "
              f"kill: {cg['kill']}; dmem controller: {'present' if cg['dmem'] else 'absent'})", highlight=False)
    for parent in cg["parents"]:
        out.print(f"  jobs under {parent}", highlight=False)
    if cg["reason"]:
        out.print(f"  {cg['reason']}", highlight=False)
    ns = report["namespaces"]
    out.print(f"namespaces: {'available' if ns['available'] else 'unavailable (' + ns['reason'] + ')'}",
              highlight=False)
    for arch, limits in report["enforcement"].items():
        table = Table(title=f"enforcement on {arch}")
        for column in ("limit", "level", "by", "note"):
            table.add_column(column)
        for name, e in limits.items():
            table.add_row(name, f"[{LEVEL_STYLE[e['level']]}]{e['level']}[/]", e["by"], e["note"])
        out.print(table)


def main() -> None:
    app()
