"""`taichi-sandbox`: run kernel files under limits, run batches, list profiles, check a limits.toml,
probe the machine, show quota usage.

`run` streams the job's stdout/stderr live, then prints the summary on stderr. Exit codes (see
README): 0 ok, 1 error, 2 usage/config error, 3-112 the job's own exit status, 113 disk limit, 114 result limit,
115 cancelled, 116 crashed, 117 rejected, 118-124 one per limit (124 = wall time as in timeout(1)), 125 internal
error, 126 preempted, 130/143 after Ctrl-C/SIGTERM (the jobs are cancelled, their results printed and audited).
"""

from __future__ import annotations

import functools
import json
import sys
import time
from concurrent.futures import CancelledError
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand
from rich.console import Console
from rich.live import Live
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

try:  # recent typer carries its own copy of click
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:
    from click.exceptions import UsageError as ClickUsageError

from .cmdline import UsageError, check_entry, entry_args, manifest, refuse_stray, split_argv
from .core.display import VERDICT_STYLE, size, summary, usage_rows
from .core.limits import BUNDLED_POLICY, ConfigError, Limits, Policy, load_policy, read_file
from .core.models import EXIT_INTERNAL, EXIT_USAGE, JobResult, JobSpec, Sample, Verdict
from .core.units import duration
from .node.supervisor import Supervisor
from .terminal import Interrupts
from .watch.echo import Echo
from .watch.monitor import JobControl

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run Taichi kernel jobs in supervised, resource-limited child processes.")
err = Console(stderr=True)


def _fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    err.print(f"taichi-sandbox: error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _policy_label(policy: Policy) -> str:
    """Which policy file was used, for people."""
    if policy.source == str(BUNDLED_POLICY):
        return f"{policy.source} (bundled: no $TAICHI_SANDBOX_LIMITS, no ./limits.toml)"
    return policy.source if policy.source != "<built-in>" else "none (built-in: nothing limited)"


def _live_table(kernel: str, limits: Limits, sample: Sample | None) -> Table:
    table = Table(title=f"running {kernel}", show_header=True)
    for column in ("resource", "used", "limit"):
        table.add_column(column)
    if sample is not None:
        for row in usage_rows(limits, sample.cpu, sample.t, sample.rss, sample.vms, sample.processes,
                               sample.output, sample.disk):
            table.add_row(*row)
    return table


class _ScriptArgv(TyperCommand):
    """`run`'s parsing: the script's argv is what follows `--`; a positional word before it is an
    error (exit 2, one line) rather than silently the script's argv (`--wall-time 5 min`)."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        words, script_argv = split_argv(args)
        try:
            rest = super().parse_args(ctx, list(words))  # click consumes the list it is given
        except ClickUsageError as e:  # one line, as every other usage error (not a box, no usage)
            raise _fail(f"{e.format_message()} (see: taichi-sandbox run --help)")
        try:
            refuse_stray(list(ctx.params.get("extra") or ()), words)
        except UsageError as e:
            raise _fail(str(e))
        ctx.params["extra"] = script_argv
        return rest


@app.command(cls=_ScriptArgv)
def run(
    file: str = typer.Argument(..., help="Taichi script to run (as __main__), or FILE:FUNCTION."),
    extra: Optional[List[str]] = typer.Argument(None, metavar="-- ARGS", help="After '--': the script's argv, or "
                                                "the entry function's args (each JSON, else a string)."),
    entry: Optional[str] = typer.Option(None, help="Function in FILE to call with the args after '--' (checked before "
                                         "the job starts)."),
    arch: str = typer.Option("cpu", help="cpu | vulkan | cuda | opengl | metal | gpu"),
    profile: Optional[str] = typer.Option(None, help="Profile from the limits file."),
    tenant: Optional[str] = typer.Option(None, help="Tenant from the limits file."),
    limits_file: Optional[Path] = typer.Option(None, help="limits.toml (default: $TAICHI_SANDBOX_LIMITS, else "
                                                          "./limits.toml, else the bundled one)."),
    cpu_time: Optional[str] = typer.Option(None, help="e.g. 2s, 1.5, 500ms"),
    wall_time: Optional[str] = typer.Option(None, help="e.g. 10s, 2m"),
    memory: Optional[str] = typer.Option(None, help="memory of the whole job (its cgroup; RSS without one), e.g. 1GiB"),
    address_space: Optional[str] = typer.Option(None, help="RLIMIT_AS: auto | SIZE | unlimited"),
    gpu_memory: Optional[str] = typer.Option(None, help="bytes (e.g. 2GiB) or fraction (e.g. 50%)"),
    max_processes: Optional[str] = typer.Option(None, help="processes in the job tree, or unlimited"),
    max_output: Optional[str] = typer.Option(None, help="stdout+stderr bytes, e.g. 10MiB"),
    max_result: Optional[str] = typer.Option(None, help="bytes of an entry function's return value, e.g. 1GiB"),
    disk: Optional[str] = typer.Option(None, help="what the job holds on disk (work dir, outputs), e.g. 4GiB"),
    grace: Optional[str] = typer.Option(None, help="SIGTERM -> SIGKILL delay, e.g. 2s"),
    launcher: Optional[str] = typer.Option(None, help="forkserver | exec"),
    inputs: Optional[List[str]] = typer.Option(None, "--input", help="File or directory copied read-only into the "
                                               "job's dir: at its path relative to this dir, else by its name; "
                                               "SRC=DEST places it at DEST; repeatable."),
    output_dir: Optional[str] = typer.Option(None, help="Where the files the job leaves are copied (new files "
                                                        "only, never overwriting; default: this dir)."),
    outputs: Optional[List[str]] = typer.Option(None, "--output", help="Which files to copy (glob, '*' also "
                                                "matches '/'; repeatable; default: '*')."),
    no_outputs: bool = typer.Option(False, "--no-outputs", help="Copy none of the files the job leaves "
                                    "(they are listed in a warning)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JobResult as JSON on stdout, nothing else "
                                 "(the job's output goes to stderr)."),
) -> None:
    """Run one Taichi job: its output streams live, then its verdict (on stderr)."""
    overrides = {k: v for k, v in dict(cpu_time=cpu_time, wall_time=wall_time, memory=memory,
                                        address_space=address_space, gpu_memory=gpu_memory,
                                        max_processes=max_processes, max_output=max_output, max_result=max_result,
                                        disk=disk, grace=grace).items() if v is not None}
    extra = extra or []
    try:
        limits = Limits.parse(overrides, "command line")
        policy = load_policy(limits_file)
        kernel = f"{file}:{entry}" if entry else file
        target = kernel.rsplit(":", 1)[0] if ":" in kernel else kernel
        if target.endswith(".py") and not Path(target).is_file():
            raise ConfigError(f"kernel file not found: {target}")
        if ":" in kernel:
            check_entry(*kernel.rsplit(":", 1))
        if no_outputs and (outputs or output_dir is not None):
            raise ConfigError("--no-outputs contradicts --output/--output-dir")
        spec = JobSpec(kernel=kernel, arch=arch, limits=limits, profile=profile, tenant=tenant,
                       args=entry_args(extra) if ":" in kernel else [],
                       argv=[] if ":" in kernel else extra, inputs=inputs or [],
                       outputs=[] if no_outputs else outputs or ["*"],
                       output_dir=None if no_outputs else output_dir or ".")
        effective = policy.resolve(profile, tenant, limits)
        if launcher is not None and launcher not in ("forkserver", "exec"):
            raise ConfigError(f"launcher: expected forkserver or exec (got {launcher!r})")
    except (ConfigError, UsageError) as e:
        raise _fail(str(e))
    live_view = err.is_terminal and not as_json
    control = JobControl()
    try:
        with Interrupts(control.cancel, err) as interrupts, Supervisor(policy, launcher=launcher) as supervisor, \
                Echo(to_stderr=as_json, raw=True) as echo:
            run_job = functools.partial(supervisor.run, spec, control=control, on_output=echo)
            if live_view:
                with Live(_live_table(kernel, effective, None), console=err, refresh_per_second=8,
                          transient=True) as live:
                    result = run_job(on_sample=lambda s: live.update(_live_table(kernel, effective, s)))
            else:
                result = run_job()
    except Exception as e:  # noqa: BLE001 - the sandbox itself failed, not the job
        raise _fail(f"internal error: {type(e).__name__}: {e}", EXIT_INTERNAL)
    if as_json:
        sys.stdout.write(result.model_dump_json() + "\n")
    else:
        err.print(summary(result, stderr_tail=False))
        err.print(f"policy: {_policy_label(policy)}", highlight=False, soft_wrap=True)
    raise typer.Exit(interrupts.exit_code or result.exit_status)


@app.command()
def profiles(limits_file: Optional[Path] = typer.Option(None, help="limits.toml to read.")) -> None:
    """List the profiles of a limits file with their effective limits."""
    try:
        policy = load_policy(limits_file)
    except ConfigError as e:
        raise _fail(str(e))
    table = Table(title=f"profiles in {_policy_label(policy)}")
    columns = {"[defaults]": policy.defaults, **policy.profiles}
    table.add_column("limit")
    for name in columns:
        table.add_column(Text(name))  # not markup: "[defaults]" is a table name
    for field in Limits.model_fields:
        table.add_row(field, *[_show(getattr(limits, field), field) for limits in columns.values()])
    Console().print(table)


def _show(value, name: str) -> str:
    if value is None:
        return "unlimited"
    sizes = ("memory", "max_output", "max_file_size", "max_result", "disk")
    if name in sizes or (name in ("address_space", "gpu_memory") and isinstance(value, int)):
        return size(value)
    if name in ("cpu_time", "wall_time", "grace", "poll_interval"):
        return duration(value)
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


@app.command()
def batch(
    files: Optional[List[str]] = typer.Argument(None, help="Kernel files (or FILE:FUNCTION) to run."),
    manifest_file: Optional[Path] = typer.Option(None, "--manifest", help="jobs.toml with [[job]] tables (kernel, arch, tenant, "
                                                      "profile, job_type, priority, args, kwargs, [job.limits])."),
    concurrency: Optional[int] = typer.Option(None, min=1, help="Jobs at once (default: node CPU slots)."),
    tenant: Optional[str] = typer.Option(None, help="Tenant for jobs that do not name one."),
    profile: Optional[str] = typer.Option(None, help="Profile for jobs that do not name one."),
    arch: str = typer.Option("cpu", help="Arch for jobs that do not name one."),
    limits_file: Optional[Path] = typer.Option(None, help="limits.toml (default: $TAICHI_SANDBOX_LIMITS, else "
                                                          "./limits.toml, else the bundled one)."),
    metrics_port: Optional[int] = typer.Option(None, help="Serve Prometheus /metrics on 127.0.0.1:PORT."),
    metrics_textfile: Optional[Path] = typer.Option(None, help="Write Prometheus metrics to this file at the end."),
    as_json: bool = typer.Option(False, "--json", help="One JobResult JSON per line, nothing else."),
) -> None:
    """Run many jobs through the executor (admission control, quotas, priorities); exit 0 when all
    are ok, 1 otherwise."""
    try:
        policy = load_policy(limits_file)
        entries = manifest(manifest_file) if manifest_file else []
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
            if spec.target()[1] is not None and spec.shipped is None:
                check_entry(*spec.target())
            policy.resolve(spec.profile, spec.tenant, spec.limits, spec.job_type)
            specs.append(spec)
    except (ConfigError, UsageError) as e:
        raise _fail(str(e))
    from .node.executor import SandboxExecutor  # imported here: `run` should not pay for prometheus-client

    out = Console()
    with SandboxExecutor(max_concurrent=concurrency, policy=policy) as executor, Interrupts(
            functools.partial(executor.shutdown, wait=False, cancel_futures=True, cancel_running=True), err,
            "the batch") as interrupts:
        if metrics_port is not None:
            executor.metrics.serve(metrics_port)
        futures = []
        for spec in specs:
            try:
                futures.append(executor.submit(spec, block=True, quiet=True))
            except RuntimeError:  # shut down by Ctrl-C/SIGTERM: the rest are cancelled
                break
        if out.is_terminal and not as_json:
            with Progress(*Progress.get_default_columns(), console=out, transient=True) as progress:
                task = progress.add_task("jobs", total=len(futures))
                for future in futures:
                    future.add_done_callback(lambda _: progress.advance(task))
                results = [_outcome(executor, spec, f) for spec, f in zip(specs, futures)]
        else:
            results = [_outcome(executor, spec, f) for spec, f in zip(specs, futures)]
        results += [_outcome(executor, spec, None) for spec in specs[len(futures):]]
        if metrics_textfile is not None:
            executor.metrics.write_textfile(str(metrics_textfile))
    if as_json:
        for result in results:
            sys.stdout.write(result.model_dump_json() + "\n")
    else:
        table = Table(title=f"{len(results)} jobs")
        for column in ("job", "kernel", "tenant", "verdict", "exit", "wall", "reason"):
            table.add_column(column)
        for spec, r in zip(specs, results):
            table.add_row(r.job_id, spec.kernel, spec.tenant or "-",
                          Text(r.verdict.value, VERDICT_STYLE.get(r.verdict.value, "bold magenta")),
                          str(r.exit_status), duration(r.usage.wall_seconds), r.reason)
        out.print(table)
    raise typer.Exit(interrupts.exit_code or (0 if all(r.verdict is Verdict.ok for r in results) else 1))


def _outcome(executor, spec: JobSpec, future) -> JobResult:
    """The job's result; a job cancelled before it started (Ctrl-C/SIGTERM) gets a `cancelled` one,
    audited like any other."""
    try:
        if future is not None:
            return future.result()
    except CancelledError:
        pass
    return executor.supervisor._not_run(spec, "cancelled before it started (the batch was interrupted)",
                                        time.time(), Verdict.cancelled)


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
                      used(t["memory"], size), used(t["gpu_memory"], size), str(t["rejections"]),
                      str(t["violations"]))
    Console().print(table)


@app.command()
def cluster(address: str = typer.Option("auto", help="The Ray cluster's address (as for ray.init)."),
            as_json: bool = typer.Option(False, "--json", help="Print the authority's usage as JSON.")) -> None:
    """What the Ray cluster's quota authority holds: tenants' leases and waiting jobs, nodes' memory."""
    from .ray import status  # Ray is an optional extra
    try:
        usage = status.read(address)
    except (ConfigError, ImportError) as e:
        raise _fail(str(e))
    if as_json:
        sys.stdout.write(json.dumps(usage, indent=2) + "\n")
        return
    for table in status.tables(usage):
        Console().print(table)


@app.command()
def report(since: Optional[str] = typer.Option(None, help="Jobs that ended since: a duration ago (7d, 12h, 30m) "
                                                        "or an ISO date/time (default: the whole log)."),
           until: Optional[str] = typer.Option(None, help="... and before: the same forms (default: now)."),
           by: str = typer.Option("tenant", help="Group by tenant, user, verdict or job_type."),
           audit_log: Optional[str] = typer.Option(None, help="The audit log (its rotated files beside it are "
                                                              "read too; default: the policy's)."),
           limits_file: Optional[Path] = typer.Option(None, help="limits.toml, for its audit_log."),
           as_json: bool = typer.Option(False, "--json", help="One object per group, and the totals."),
           as_csv: bool = typer.Option(False, "--csv", help="A header and one row per group.")) -> None:
    """Accounting from the audit log: per group, jobs, CPU and wall seconds, reserved memory and GPU
    memory × time, peak memory, violations, preemptions, refused requests and queue wait."""
    from .node import report as accounting
    from .node.accounting import AccountingError
    try:
        if as_json and as_csv:
            raise ValueError("--json and --csv: choose one")
        path = Path(audit_log) if audit_log else load_policy(limits_file).settings.resolved_audit_log()
        found = accounting.build(path, by, since, until)
    except (ValueError, ConfigError) as e:
        raise _fail(str(e))
    except AccountingError as e:
        raise _fail(str(e), 1)
    for problem in found.problems:
        err.print(f"taichi-sandbox: warning: {problem}", markup=False, highlight=False, soft_wrap=True)
    if found.skipped_lines:
        err.print(f"taichi-sandbox: warning: {found.skipped_lines} unreadable audit lines skipped", highlight=False)
    if as_json or as_csv:
        sys.stdout.write(accounting.to_json(found) if as_json else accounting.to_csv(found))
        return
    out = Console()
    (out if out.is_terminal else Console(width=160)).print(accounting.table(found, f"jobs by {by} ({path}{', since ' + since if since else ''}"
                                            f"{', until ' + until if until else ''})"))


LEVEL_STYLE = {"hard": "green", "watched": "cyan", "unavailable": "red", "off": "dim"}


@app.command()
def probe(as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")) -> None:
    """What this machine can enforce: archs that initialise, NVML, MPS, cgroups, and per arch
    whether each limit is hard, watched or unavailable (with the reason)."""
    from .watch.enforcement import machine_report
    from .watch.gpu import NvmlSampler

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
            out.print(f"  GPU {d['index']}: {d['name']} {size(d['memory_total'])} {d['uuid']}", highlight=False)
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
    sf = report["syscall_filter"]
    out.print(f"system-call filter: {'available' if sf['available'] else 'unavailable (' + sf['reason'] + ')'}",
              highlight=False)
    disk = report["disk"]
    held = "a filesystem image per job (ext4 on a loop device)" if disk["images"] else f"polled ({disk['reason']})"
    out.print(f"disk: {held}", highlight=False)
    for arch, limits in report["enforcement"].items():
        table = Table(title=f"enforcement on {arch}")
        for column in ("limit", "level", "by", "note"):
            table.add_column(column)
        for name, e in limits.items():
            table.add_row(name, f"[{LEVEL_STYLE[e['level']]}]{e['level']}[/]", e["by"], e["note"])
        out.print(table)


def main() -> None:
    app()
