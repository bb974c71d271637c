"""The `taichi-sandbox` entry point, and the thin client of the node service (`taichi-sandbox serve`).

`run`, `batch` and `quota` talk to the service when `--socket` or $TAICHI_SANDBOX_SOCKET names
one, or the default socket exists (see `frames.default_socket`); `--local` (or no service at the
default socket) runs them in-process as `sandbox.cli` does. `ps`, `cancel`, `logs` and `events`
always talk to a service. Files are the client's own (see `sandbox.remote`). Only the standard
library is imported on the way to the service (pydantic and rich only to draw a human-readable
verdict); the protocol's Python face is `sandbox.remote`.

Exit codes as `sandbox.cli`: the verdict's code for `run`; 2 for a usage error or a refused
request; 125 when the service went away before the verdict.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cmdline import UsageError, check_entry, entry_args, manifest, refuse_stray, split_argv
from .remote import (EXIT_USAGE, ClientError, Incomplete, Job, choose_socket, one, request, submit_and_follow,
                     submit_in_requests)

SERVICE_COMMANDS = {"ps", "cancel", "logs", "events"}
EITHER_COMMANDS = {"run", "batch", "quota"}
LIMIT_OPTIONS = ("cpu_time", "wall_time", "memory", "address_space", "gpu_memory", "max_processes", "max_output",
                 "max_result", "disk", "grace")


class _Show:
    """`on_answer` for the CLI: a lone refused job is an error; output is echoed; usage is drawn on
    a terminal; the `submitted` answer is kept (for a cancel on Ctrl-C)."""

    def __init__(self, echo: bool) -> None:
        self.echo, self.submitted = echo, None

    def __call__(self, answer: dict) -> None:
        kind = answer.get("type")
        if kind == "submitted":
            self.submitted = answer
            refused = [j for j in answer["jobs"] if j["state"] == "refused"]
            if len(refused) == len(answer["jobs"]) == 1:
                raise ClientError(f"{refused[0]['code']}: {refused[0]['reason']}")
        elif kind == "output" and self.echo:
            stream = sys.stdout if answer.get("stream") == "stdout" else sys.stderr
            stream.write(answer.get("data", ""))
            stream.flush()
        elif kind == "sample" and sys.stderr.isatty():
            s = answer["sample"]
            sys.stderr.write(f"\r\033[2K{s['t']:.1f}s  cpu {s['cpu']:.2f}s  rss {s['rss'] / 2**20:.0f} MiB  "
                             f"processes {s['processes']}")
            sys.stderr.flush()


def _render(result: dict) -> None:
    """The human-readable verdict, as the in-process CLI draws it."""
    from rich.console import Console

    from .core.models import JobResult
    from .core.display import summary
    if sys.stderr.isatty():
        sys.stderr.write("\r\033[2K")
    Console(stderr=True).print(summary(JobResult.model_validate(result), stderr_tail=False))


def run(path: Path, args: argparse.Namespace) -> int:
    kernel = f"{args.file}:{args.entry}" if args.entry else args.file
    if ":" in kernel:
        check_entry(*kernel.rsplit(":", 1))
    limits = {name: getattr(args, name) for name in LIMIT_OPTIONS if getattr(args, name) is not None}
    if args.no_outputs and (args.outputs or args.output_dir is not None):
        raise ClientError("--no-outputs contradicts --output/--output-dir")
    job = Job(kernel, inputs=args.inputs, output_dir=None if args.no_outputs else args.output_dir or ".",
              outputs=args.outputs, arch=args.arch,
              profile=args.profile, tenant=args.tenant, limits=limits,
              args=entry_args(args.extra) if ":" in kernel else [], argv=[] if ":" in kernel else args.extra)
    show = _Show(echo=not args.json)
    try:
        _, results = submit_and_follow(path, [job], output=not args.json, samples=not args.json, on_answer=show)
    except KeyboardInterrupt:
        job_id = show.submitted["jobs"][0]["job_id"] if show.submitted else None
        if job_id is not None:
            one(path, {"op": "cancel", "job_id": job_id})
        raise ClientError(f"interrupted: job {job_id} cancelled", 130) from None
    result = results[0]  # a lone refused job raised in `show`; a lost verdict, Incomplete
    if args.json:
        sys.stdout.write(json.dumps(result["result"]) + "\n")
    else:
        _render(result["result"])
    return result["exit_status"]


def batch(path: Path, args: argparse.Namespace) -> int:
    entries = []
    if args.manifest:
        from .core.limits import ConfigError
        try:
            entries = manifest(Path(args.manifest))
        except ConfigError as err:
            raise ClientError(str(err)) from None
    entries += [{"kernel": f} for f in args.files]
    if not entries:
        raise ClientError("no jobs: give kernel files or --manifest")
    jobs: list[Job] = []
    try:
        for entry in entries:
            jobs.append(Job(**{"arch": args.arch, "tenant": args.tenant, "profile": args.profile, **entry}))
        submitted, results = submit_in_requests(path, jobs)
        incomplete = None
    except Incomplete as err:  # show what came, then fail
        submitted, results, incomplete = err.submitted, err.results, err
    finally:
        for job in jobs:
            job.close()
    refused = [j for j in submitted if j["state"] == "refused"]
    for number, job in enumerate(submitted, 1):
        if job["state"] == "refused":
            sys.stderr.write(f"taichi-sandbox: job {number} refused: {job['code']}: {job['reason']}\n")
    for answer in results:
        r = answer["result"]
        if args.json:
            sys.stdout.write(json.dumps(r) + "\n")
        else:
            sys.stdout.write(f"{r['job_id']}  {r['kernel']}  {r['verdict']}  exit {answer['exit_status']}  "
                             f"{r['usage']['wall_seconds']:.2f}s  {r['reason']}\n")
    if incomplete is not None:
        raise incomplete
    return 0 if not refused and all(a["result"]["verdict"] == "ok" for a in results) else 1


def _size(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}MiB"


def ps(path: Path, args: argparse.Namespace) -> int:
    jobs = one(path, {"op": "ps"})["jobs"]
    if args.json:
        sys.stdout.write(json.dumps(jobs) + "\n")
        return 0
    print(f"{'JOB':14} {'TENANT':12} {'USER':10} {'STATE':8} {'CPU':>7} {'WALL':>7} {'RSS':>8}  KERNEL")
    for j in jobs:
        u = j["usage"] or {}
        print(f"{j['job_id']:14} {str(j['tenant']):12} {j['user']:10} {j['state']:8} "
              f"{u.get('cpu', 0):7.2f} {u.get('wall', 0):7.2f} {_size(u.get('rss')):>8}  {j['kernel']}")
        if j.get("waiting"):
            print(f"{'':14} waits: {j['waiting']}")
    return 0


def quota(path: Path, args: argparse.Namespace) -> int:
    state = one(path, {"op": "quota"})["state"]
    if args.json:
        sys.stdout.write(json.dumps(state, indent=2) + "\n")
        return 0
    print(f"{'TENANT':16} {'RUNNING':>7} {'QUEUED':>7} {'CONCURRENCY':>11} {'MEMORY':>16} {'REJECTED':>8}")
    for name, t in state["tenants"].items():
        conc, mem = t["concurrency"], t["memory"]
        print(f"{name:16} {t['running']:7} {t['queued']:7} {str(conc['used']) + '/' + str(conc['quota'] or '-'):>11} "
              f"{_size(mem['used']) + '/' + _size(mem['quota']):>16} {t['rejections']:8}")
    return 0


def cancel(path: Path, args: argparse.Namespace) -> int:
    answer = one(path, {"op": "cancel", "job_id": args.job})
    print(f"cancel {args.job}: it was {answer['state']}")
    return 0


def logs(path: Path, args: argparse.Namespace) -> int:
    for answer in request(path, {"op": "logs", "job_id": args.job, "follow": args.follow}):
        if answer.get("type") == "output":
            stream = sys.stdout if answer.get("stream") == "stdout" else sys.stderr
            stream.write(answer.get("data", ""))
            stream.flush()
    return 0


def events(path: Path, args: argparse.Namespace) -> int:
    try:
        for answer in request(path, {"op": "events"}):
            sys.stdout.write(json.dumps(answer["event"]) + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="taichi-sandbox", description="Client of the taichi-sandbox node service.")
    commands = top.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--socket", help="the service's socket (default: $TAICHI_SANDBOX_SOCKET, else the "
                                          "default socket when it exists)")
        sub.add_argument("--json", action="store_true", help="JSON output")
        return sub
    r = command("run", "Run one job through the node service and print its verdict.")
    r.add_argument("file")
    r.add_argument("extra", nargs="*", help=argparse.SUPPRESS)  # only to name a stray word: argv goes after --
    for name in ("entry", "profile", "tenant", "output_dir", *LIMIT_OPTIONS):
        r.add_argument(f"--{name.replace('_', '-')}", dest=name)
    r.add_argument("--input", dest="inputs", action="append", help="a file or directory the job gets in its dir "
                   "(SRC=DEST places it at DEST; repeatable)")
    r.add_argument("--output", dest="outputs", action="append", help="which files to copy to --output-dir")
    r.add_argument("--no-outputs", action="store_true", help="copy none of the files the job leaves")
    r.add_argument("--arch", default="cpu")
    b = command("batch", "Run many jobs through the node service.")
    b.add_argument("files", nargs="*")
    for name in ("manifest", "tenant", "profile"):
        b.add_argument(f"--{name}", dest=name)
    b.add_argument("--arch", default="cpu")
    command("ps", "Running and queued jobs you may see: id, tenant, user, state, usage.")
    for name, help_text in (("cancel", "Cancel a queued or running job."), ("logs", "A job's output.")):
        sub = command(name, help_text)
        sub.add_argument("job")
        if name == "logs":
            sub.add_argument("--follow", "-f", action="store_true", help="until the job ends")
    command("events", "Verdicts and alerts as they happen (JSON lines).")
    command("quota", "Tenants' usage against their quotas, from the service.")
    return top


HANDLERS = {"run": run, "batch": batch, "ps": ps, "quota": quota, "cancel": cancel, "logs": logs, "events": events}
LOCAL_ONLY = ("--limits-file", "--launcher", "--concurrency", "--metrics-port", "--metrics-textfile", "--state")


def main(argv: list[str] | None = None) -> None:
    """Dispatch: `serve` to the service, node commands to a service, everything else to sandbox.cli."""
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    if command == "serve":
        from .node.service import main as serve
        sys.exit(serve(argv[1:]))
    if command in SERVICE_COMMANDS or (command in EITHER_COMMANDS and "--local" not in argv):
        explicit = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--socket"), None)
        explicit = explicit or next((a.split("=", 1)[1] for a in argv if a.startswith("--socket=")), None)
        path = choose_socket(explicit)
        if path is not None or command in SERVICE_COMMANDS:
            sys.exit(_remote(path, argv))
    if command == "warm":
        from .warm.client import command as warm
        sys.exit(warm(argv[1:]))
    sys.argv = [sys.argv[0], *[a for a in argv if a != "--local"]]
    if command == "run":
        from .warm.client import run_warm
        run_warm(sys.argv)  # exits with the run's status, or returns: run it in-process
    from .cli import main as local
    if command in (None, "--help", "-h"):
        print("Node service: taichi-sandbox serve | ps | cancel JOB | logs JOB [--follow] | events "
              "(run, batch and quota use a running service unless --local). Warm server of `run`: "
              "taichi-sandbox warm status | stop.")
    local()


def _remote(path: Path | None, argv: list[str]) -> int:
    try:
        if path is None:
            raise ClientError("no node service: give --socket or $TAICHI_SANDBOX_SOCKET, or start "
                              "`taichi-sandbox serve`")
        local_only = [a.split("=")[0] for a in argv if a.split("=")[0] in LOCAL_ONLY]
        if local_only:
            raise ClientError(f"{local_only[0]} applies only in-process: add --local")
        words, script_argv = split_argv(argv)
        args, unknown = parser().parse_known_args(words)
        if args.command == "run":
            refuse_stray(args.extra + [w for w in unknown if not w.startswith("-")], words)
            args.extra = script_argv
        if unknown:
            parser().error(f"unrecognized arguments: {' '.join(unknown)}")
        return HANDLERS[args.command](path, args)
    except ClientError as err:
        print(f"taichi-sandbox: error: {err}", file=sys.stderr)
        return err.code
    except UsageError as err:
        print(f"taichi-sandbox: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # the service cancels the jobs this client followed when it leaves
        print("taichi-sandbox: interrupted: the service cancels the jobs this client followed", file=sys.stderr)
        return 130
