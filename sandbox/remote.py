"""Talking to the node service from Python, with the standard library only: the CLI client and Ray
tasks use it. Files are opened here, with the caller's own permissions: a kernel file's contents
and the inputs' open descriptors are sent, and output files come back as descriptors that are
copied into the caller's output dir; the service never opens a caller's path.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path, PurePosixPath
TYPE_CHECKING = False

if TYPE_CHECKING:  # annotations only: `typing` costs the client 2 ms to import
    from collections.abc import Callable, Iterator

from .core.placement import check_places, named, place
from .node import frames

EXIT_USAGE, EXIT_INTERNAL = 2, 125
MAX_BATCH = 1000  # jobs per request (sandbox.node.protocol.MAX_JOBS_PER_REQUEST)
MAX_CONNECTIONS = 8  # requests one batch follows at once (below [service] max_connections_per_uid)
REQUEST_BYTES = 6 << 20  # per request, below the service's default max_request_bytes (8 MiB)
MAX_INPUTS = 64  # files per job (sandbox.job.inputs.MAX_INPUTS)
MAX_DEPTH = 32  # levels of an input directory (sandbox.job.files.MAX_DEPTH)
_READ = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


class ClientError(Exception):
    """A one-line error for the user; `code` is the exit status."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class Incomplete(ClientError):
    """Fewer verdicts came than jobs were admitted (the service ended, the connection was lost):
    what did come is in `submitted` (each job's entry) and `results`."""

    def __init__(self, submitted: list[dict], results: list[dict], where: Path) -> None:
        admitted = sum(1 for job in submitted if job.get("job_id"))
        super().__init__(f"received {len(results)} of {admitted} jobs' verdicts: the node service at {where} closed "
                         "the connection before the others", EXIT_INTERNAL)
        self.submitted, self.results = submitted, results


def choose_socket(explicit: str | None) -> Path | None:
    """The service's socket: the one named (--socket, $TAICHI_SANDBOX_SOCKET), else the default one
    when a service answers there; None: run in-process."""
    named = explicit or os.environ.get("TAICHI_SANDBOX_SOCKET")
    if named:
        return Path(named)
    default = frames.default_socket()
    if default is None or not default.is_socket():
        return None
    try:
        connect(default).close()
    except ClientError:
        return None  # left by a service that is gone
    return default


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as err:
        sock.close()
        raise ClientError(f"cannot reach the node service at {path}: {err.strerror or err}") from None
    return sock


def request(path: Path, message: dict, fds: list[int] = (),
            on_open: Callable[[Callable[[dict], None]], None] | None = None) -> Iterator[dict]:
    """Send one request (with `fds`); yield the answers until the service says `end` (or closes).
    A "file" answer holds its descriptor as "fd" (the caller closes it). An error answer raises
    ClientError. `on_open` gets a function that sends a frame on this connection (from any one
    thread; OSError once the connection is gone)."""
    with connect(path) as sock:
        try:
            frames.send(sock, message, fds)
            if on_open is not None:
                on_open(lambda frame: frames.send(sock, frame))
            while True:
                received: list[int] = []
                answer = frames.recv(sock, fds=received)
                if answer is not None and answer.get("type") == "file" and received:
                    answer["fd"] = received.pop(0)
                for fd in received:
                    os.close(fd)
                if answer is None or answer.get("type") == "end":
                    return
                if answer.get("type") == "error":
                    raise ClientError(f"{answer.get('code')}: {answer.get('message')}")
                yield answer
        except (OSError, frames.FrameError) as err:
            raise ClientError(f"lost the node service at {path}: {err}", EXIT_INTERNAL) from None


def one(path: Path, message: dict) -> dict:
    for answer in request(path, message):
        return answer
    raise ClientError(f"the node service at {path} closed the connection without answering", EXIT_INTERNAL)


class Job:
    """One job on its way to the service: the request's fields (a kernel file's contents travel with
    its name only; each input as its name in the job's dir), the inputs' open descriptors, and where
    its output files go (the client's own directory). `close()` the descriptors once sent."""

    def __init__(self, kernel: str, inputs: list[str] | None = None, output_dir: str | None = None,
                 outputs: list[str] | None = None, **fields) -> None:
        target, _, function = kernel.rpartition(":") if ":" in kernel else (kernel, "", "")
        self.fields = {key: value for key, value in fields.items() if value not in (None, [], {})}
        if target.endswith(".py") or not function:
            try:
                self.fields["source"] = Path(target).read_text()
            except FileNotFoundError:
                raise ClientError(f"kernel file not found: {target}") from None
            except (OSError, UnicodeDecodeError) as err:
                raise ClientError(f"cannot read kernel file {target}: {err}") from None
            kernel = Path(target).name + (f":{function}" if function else "")
        if outputs and output_dir is None:
            raise ClientError("outputs need an output dir to copy them to")
        self.fields["kernel"] = kernel
        self.output_dir = None if output_dir is None else str(Path(output_dir).expanduser().absolute())
        if output_dir is not None:
            self.fields["outputs"] = ["*"] if outputs is None else outputs
        names, self.fds, skipped = open_inputs(inputs or [])
        self.notes = [f"WARNING: inputs: {len(skipped)} entries of input directories not sent (symlinks, devices, "
                      f"fifos, sockets: nothing in them is followed): {named(skipped)}"] if skipped else []
        if names:
            self.fields["inputs"] = names

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


def open_inputs(inputs: list) -> tuple[list[str], list[int], list[str]]:
    """(the names in the job's dir, the open descriptors, the entries skipped) of the files that
    `inputs` put there (see sandbox.core.placement): a directory as its files, opened below it
    without following symlinks. Raises ClientError."""
    try:
        places = [place(entry) for entry in inputs]
        check_places(places)
    except ValueError as err:
        raise ClientError(f"inputs: {err}") from None
    names: list[str] = []
    fds: list[int] = []
    skipped: list[str] = []
    try:
        for source, dest in places:
            try:
                fd = os.open(source, _READ)
            except OSError as err:
                raise ClientError(f"input {source}: {err.strerror or err}") from None
            _add_input(fd, source, dest, (names, fds, skipped), 0)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return names, fds, skipped


def _add_input(fd: int, source: str, dest: str, found: tuple[list, list, list], depth: int) -> None:
    """Add the file open as `fd` to `found` (names, descriptors, skipped), or a directory's files
    (it is closed here)."""
    import stat
    names, fds, skipped = found
    if not stat.S_ISDIR(os.fstat(fd).st_mode):
        names.append(dest)
        fds.append(fd)
        if len(fds) > MAX_INPUTS:
            raise ClientError(f"input {source}: more than {MAX_INPUTS} files: the node service takes at most "
                              f"{MAX_INPUTS} per job: pack them (e.g. one .npz), or run with --local")
        return
    try:
        if depth > MAX_DEPTH:
            raise ClientError(f"input {source}: more than {MAX_DEPTH} levels deep")
        with os.scandir(fd) as entries:
            listed = sorted(entry.name for entry in entries)
        for name in listed:
            inner = f"{source.rstrip('/')}/{name}"
            try:
                mode = os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
                child = os.open(name, _READ | os.O_NOFOLLOW, dir_fd=fd) if stat.S_ISDIR(mode) or stat.S_ISREG(
                    mode) else None
            except OSError as err:
                raise ClientError(f"input {inner}: {err.strerror or err}") from None
            if child is None:
                skipped.append(inner)
            else:
                _add_input(child, inner, f"{dest}/{name}", found, depth + 1)
    finally:
        os.close(fd)


def save_file(output_dir: str | None, answer: dict) -> str:
    """Copy the output file of a "file" answer (its descriptor, closed here) to a new file in
    `output_dir` at its relative name (see sandbox.job.safefs.create_beneath: no symlink below
    `output_dir` is followed, nothing is overwritten); the copy's path. Raises OSError
    (FileExistsError for a name that exists), or ClientError for a name outside the dir."""
    fd = answer.pop("fd", None)
    try:
        name = str(answer.get("name", ""))
        parts = PurePosixPath(name).parts
        if fd is None or output_dir is None or not parts or name.startswith("/") or ".." in parts:
            raise ClientError(f"the service sent an output file without its descriptor or a usable name: {name!r}")
        from .job.safefs import create_beneath  # only when a file comes: it costs the client's start
        os.makedirs(output_dir, exist_ok=True)
        top = os.open(output_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            out = create_beneath(top, name)
        finally:
            os.close(top)
        with os.fdopen(fd, "rb", closefd=False) as source, os.fdopen(out, "wb") as sink:
            while chunk := source.read(1 << 20):
                sink.write(chunk)
        return str(Path(output_dir, name))
    finally:
        if fd is not None:
            os.close(fd)


def submit_and_follow(path: Path, jobs: list[Job], output: bool = True, samples: bool = False,
                      on_answer: Callable[[dict], None] | None = None,
                      on_open: Callable[[Callable[[dict], None]], None] | None = None) -> tuple[dict, list[dict]]:
    """Submit `jobs` and follow them to their verdicts: (the `submitted` answer, the "result"
    answers in order of arrival). Output files are copied into each job's output dir as they come;
    a result's `outputs` lists those copies. `on_answer` sees the other answers as they come (the
    `submitted` one first). A job this client stops following is cancelled by the service. Raises
    Incomplete when fewer verdicts came than jobs were admitted. `on_open`: see `request` (for the
    `lease` frames of sandbox.ray)."""
    message = {"op": "submit", "jobs": [job.fields for job in jobs], "follow": True, "output": output,
               "samples": samples}
    submitted, results, dirs, saved, notes, sent_notes, existing = None, [], {}, {}, {}, {}, {}
    try:
        for answer in request(path, message, [fd for job in jobs for fd in job.fds], on_open):
            kind, job_id = answer.get("type"), answer.get("job_id")
            if kind == "submitted":
                submitted = answer
                for job in jobs:
                    job.close()  # sent: the service holds its own copies of the descriptors
                dirs = {a["job_id"]: job.output_dir for a, job in zip(answer["jobs"], jobs) if a["job_id"]}
                sent_notes = {a["job_id"]: job.notes for a, job in zip(answer["jobs"], jobs) if a["job_id"]}
            elif kind == "file":
                try:
                    saved.setdefault(job_id, []).append(save_file(dirs.get(job_id), answer))
                except FileExistsError:
                    existing.setdefault(job_id, []).append(str(answer.get("name")))
                except (OSError, ClientError) as err:
                    notes.setdefault(job_id, []).append(f"WARNING: outputs: {answer.get('name')} not saved here: {err}")
                continue
            elif kind == "result":
                answer["result"]["outputs"] = saved.pop(job_id, [])
                answer["result"]["notes"] += sent_notes.get(job_id, []) + notes.pop(job_id, [])
                if job_id in existing:
                    names = existing.pop(job_id)
                    answer["result"]["notes"].append(
                        f"WARNING: outputs: {len(names)} file(s) not copied: their names exist in {dirs[job_id]} "
                        f"(nothing is overwritten): {named(names)}")
                results.append(answer)
            if on_answer is not None:
                on_answer(answer)
    finally:
        for job in jobs:
            job.close()
    if submitted is None:
        raise ClientError(f"the node service at {path} closed the connection without answering", EXIT_INTERNAL)
    if len(results) < sum(1 for job in submitted["jobs"] if job.get("job_id")):
        raise Incomplete(submitted["jobs"], results, path)
    return submitted, results


def split(jobs: list[Job]) -> list[list[Job]]:
    """`jobs` cut into requests of at most MAX_BATCH jobs, frames.MAX_FDS descriptors and
    REQUEST_BYTES bytes (kernel sources included)."""
    requests: list[list[Job]] = [[]]
    fds = size = 0
    for job in jobs:
        job_size = len(json.dumps(job.fields))
        if requests[-1] and (len(requests[-1]) == MAX_BATCH or fds + len(job.fds) > frames.MAX_FDS
                             or size + job_size > REQUEST_BYTES):
            requests.append([])
            fds = size = 0
        requests[-1].append(job)
        fds, size = fds + len(job.fds), size + job_size
    return requests


def submit_in_requests(path: Path, jobs: list[Job]) -> tuple[list[dict], list[dict]]:
    """Submit `jobs` in as many requests as they need, followed at once over as many connections;
    (each job's `submitted` entry in order, the results). Raises Incomplete, with all that came, when
    any request got fewer verdicts than it had jobs admitted. On Ctrl-C the process may simply exit:
    the service cancels the jobs of connections that close."""
    import threading  # only a batch needs it
    requests = split(jobs)
    if len(requests) > MAX_CONNECTIONS:
        raise ClientError(f"{len(jobs)} jobs need {len(requests)} requests (at most {MAX_BATCH} jobs and "
                          f"{frames.MAX_FDS} inputs each); one batch may use {MAX_CONNECTIONS}: split it")
    answers: list = [None] * len(requests)

    def follow(number: int) -> None:
        try:
            answers[number] = submit_and_follow(path, requests[number], output=False)
        except ClientError as err:
            answers[number] = err
    threads = [threading.Thread(target=follow, args=(n,), daemon=True) for n in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)
    for answer in answers:
        if isinstance(answer, ClientError) and not isinstance(answer, Incomplete):
            raise answer
    done = [(a.submitted, a.results) if isinstance(a, Incomplete) else (a[0]["jobs"], a[1]) for a in answers]
    submitted, results = [j for jobs, _ in done for j in jobs], [r for _, got in done for r in got]
    if any(isinstance(answer, Incomplete) for answer in answers):
        raise Incomplete(submitted, results, path)
    return submitted, results
