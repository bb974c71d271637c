"""Job specification and result models: what goes in, what comes out. Both round-trip through JSON."""

from __future__ import annotations

import os
import re
import time
import uuid
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .limits import ConfigError, Limits, Priority, _Strict
from .placement import check_places, place
from .shipping import Shipped, prepare
from .units import duration
from .values import decode_json_fields, wire

TIMELINE_MAX = 600
TAIL_BYTES = 16 * 1024



def output_destination(path: str) -> str:
    """`JobSpec.output_dir` made absolute against the caller's working directory."""
    if not path.strip():
        raise ValueError("empty output_dir")
    return str(Path(path).expanduser().absolute())


class Enforcement(BaseModel):
    """How one limit is enforced for a job (see sandbox.watch.enforcement)."""

    level: Literal["hard", "watched", "unavailable", "off"]
    by: str = ""
    note: str = ""


class Verdict(str, Enum):
    """How a job ended. Limit verdicts are named after the limit that was broken."""

    ok = "ok"
    error = "error"
    cpu_time = "cpu_time"
    wall_time = "wall_time"
    memory = "memory"
    address_space = "address_space"
    gpu_memory = "gpu_memory"
    processes = "processes"
    output = "output"
    result = "result"
    disk = "disk"
    crashed = "crashed"
    rejected = "rejected"
    cancelled = "cancelled"
    preempted = "preempted"

    def __str__(self) -> str:
        return self.value


# Exit codes of `taichi-sandbox run`, in the spirit of timeout(1): the sandbox's own codes are 2 and
# 113-126 (124 wall time, 125 internal error, 126 preempted); a job's own exit status 3-112 passes through (see
# JobResult.exit_status); 130/143 after Ctrl-C/SIGTERM on the CLI.
EXIT_CODES = {
    Verdict.ok: 0, Verdict.error: 1, Verdict.disk: 113, Verdict.result: 114, Verdict.cancelled: 115,
    Verdict.crashed: 116, Verdict.rejected: 117,
    Verdict.output: 118, Verdict.processes: 119, Verdict.gpu_memory: 120, Verdict.address_space: 121,
    Verdict.memory: 122, Verdict.cpu_time: 123, Verdict.wall_time: 124, Verdict.preempted: 126,
}
JOB_EXIT_STATUSES = range(3, 113)  # a job's own exit status that the CLI passes through unchanged
EXIT_USAGE = 2
EXIT_INTERNAL = 125

_JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
_KERNEL_ENTRY = re.compile(r"^(?P<target>.+?)(?::(?P<func>[A-Za-z_][A-Za-z0-9_]*))?$")


class JobSpec(_Strict):
    """One job: what to run, where, and under which limits.

    `kernel` is a Python file run as `__main__` (unmodified Taichi scripts work), or `file.py:function`
    / `package.module:function`, called with `args`/`kwargs` (JSON values and numpy arrays), or any
    callable (also "__main__:function"), shipped with its args and kwargs (sandbox.core.shipping); then
    `kernel` becomes its name. Its return value comes back in the result (sandbox.job.results).

    `inputs`: files and directories copied read-only into the job's cwd before it starts, each a
    path, "SRC=DEST" or a pair, placed as sandbox.core.placement says (kept as (SRC, DEST) pairs,
    DEST decided against the caller's cwd when the spec is made). `outputs`: fnmatch patterns
    of files in the job's cwd copied to `output_dir` (absolute, or relative to the caller's cwd)
    after it ends and listed in `JobResult.outputs` (see sandbox.job.files). `binds`: directories
    of the caller the job sees read-write at the same absolute path (see sandbox.job.binds).
    """

    kernel: str
    arch: Literal["cpu", "vulkan", "cuda", "opengl", "metal", "gpu"] = "cpu"
    limits: Limits = Limits()
    profile: str | None = None
    tenant: str | None = None
    job_type: str | None = None
    priority: Priority | None = None
    args: wire(list[Any], check=True) = []
    kwargs: wire(dict[str, Any], check=True) = {}
    shipped: Shipped | None = None
    argv: list[str] = []
    env: dict[str, str] = {}
    labels: dict[str, str] = {}
    inputs: list[tuple[str, str]] = []
    outputs: list[str] = []
    output_dir: str | None = None
    binds: list[str] = []
    job_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])

    @model_validator(mode="wrap")
    @classmethod
    def _prepare(cls, data: Any, handler, info) -> "JobSpec":
        """A callable kernel is shipped (sandbox.core.shipping). From JSON, args and kwargs are decoded
        here: pydantic validates JSON through the custom __init__, in Python mode."""
        return handler(prepare(decode_json_fields(data, ("args", "kwargs")) if info.mode == "json" else data))

    @field_validator("kernel")
    @classmethod
    def _kernel_form(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("empty kernel")
        return value

    @field_validator("job_id")
    @classmethod
    def _job_id_form(cls, value: str) -> str:
        if not _JOB_ID.fullmatch(value):
            raise ValueError("1-64 letters, digits, '_', '-' or '.', not starting with '.' "
                             "(it names the job's directories and cgroup)")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name or "=" in name or "\0" in name or "\0" in value[name]:
                raise ValueError(f"invalid environment variable {name!r}")
        return value

    @field_validator("inputs", mode="before")
    @classmethod
    def _input_places(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            return value
        places = [place(entry) for entry in value]
        check_places(places)
        return places

    @field_validator("binds")
    @classmethod
    def _bind_paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.startswith("/") or path == "/" or os.path.normpath(path) != path.rstrip("/") or "\0" in path:
                raise ValueError(f"{path!r}: not an absolute, normalized directory path other than /")
        return list(dict.fromkeys(path.rstrip("/") for path in value))

    @field_validator("output_dir")
    @classmethod
    def _output_dir_absolute(cls, value: str | None) -> str | None:
        return output_destination(value) if value is not None else None

    @model_validator(mode="after")
    def _outputs_have_a_destination(self) -> "JobSpec":
        if self.outputs and self.output_dir is None:
            raise ValueError("outputs need an output_dir to copy them to")
        return self

    def target(self) -> tuple[str, str | None]:
        """(file or module, function or None)."""
        m = _KERNEL_ENTRY.match(self.kernel)
        if m is None:  # pragma: no cover - the pattern matches any non-empty string
            raise ConfigError(f"JobSpec: kernel={self.kernel!r}: not FILE[:FUNCTION] or MODULE:FUNCTION")
        return m.group("target"), m.group("func")


def as_spec(job: "JobSpec | Callable") -> "JobSpec":
    """`job` itself, or a JobSpec running the callable `job` with no arguments."""
    return job if isinstance(job, JobSpec) else JobSpec(kernel=job)


class Violation(BaseModel):
    """A limit that was reached (action 'warn' at 80%/90%) or broken (action 'sigterm'/'sigkill'/'none')."""

    at: float
    pid: int | None = None
    resource: str
    limit: float
    observed: float
    action: Literal["warn", "sigterm", "sigkill", "none"]
    detected_by: Literal["monitor", "cgroup", "rlimit", "child", "supervisor", "fork-server"]


class Usage(BaseModel):
    """What the job used. `peak_memory` is the kernel's peak charge for the job cgroup (RSS, page
    cache, tmpfs, memfd, shm); None without a memory cgroup. `peak_disk`: the most its work dir was
    seen to hold (sandbox.job.disk); None without a disk limit."""

    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0
    peak_rss: int = 0
    peak_memory: int | None = None
    peak_vms: int = 0
    peak_processes: int = 0
    peak_gpu_memory: int | None = None
    output_bytes: int = 0
    peak_disk: int | None = None


class Sample(BaseModel):
    """One monitor reading of the whole job tree (`memory`: the cgroup's charge, where there is one)."""

    t: float
    rss: int
    vms: int
    cpu: float
    processes: int
    output: int
    gpu_memory: int | None = None
    memory: int | None = None
    disk: int | None = None


class Termination(BaseModel):
    """What the supervisor did to end the job, when it had to. `detail`: why it was ended on request,
    in words (a preemption names the job that needed the room)."""

    reason: str
    detail: str = ""
    sigterm_at: float | None = None
    sigkill_at: float | None = None
    terminated_pids: list[int] = []
    killed_pids: list[int] = []


class JobResult(BaseModel):
    """The verdict of one job, with evidence. `verdict` is decided by the first non-warning violation."""

    model_config = ConfigDict(use_enum_values=False)

    job_id: str
    kernel: str
    arch: str
    verdict: Verdict
    reason: str = ""
    exit_code: int | None = None
    signal: str | None = None
    violations: list[Violation] = []
    usage: Usage = Usage()
    limits: Limits = Limits()
    rlimits: dict[str, int | None] = {}
    enforcement: dict[str, Enforcement] = {}
    enforced: str = ""  # `enforcement` in one line: what held the limits, what was only polled and why
    notes: list[str] = []
    outputs: list[str] = []
    return_value: wire(Any, check=False) = None
    error_type: str | None = None
    error_message: str | None = None
    traceback: str | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    ti_init: list[dict[str, Any]] = []
    timeline: list[Sample] = []
    termination: Termination | None = None
    launcher: str = ""
    labels: dict[str, str] = {}
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.ok

    @classmethod
    def not_run(cls, spec: "JobSpec", verdict: Verdict, reason: str, started: float | None = None,
                launcher: str = "") -> "JobResult":
        """The result of a job that has no verdict of its own (refused, cancelled before it started,
        lost with its supervisor): `started` defaults to now, and it ends now."""
        now = time.time()
        return cls(job_id=spec.job_id, kernel=spec.kernel, arch=spec.arch, verdict=verdict, reason=reason,
                   labels=spec.labels, started_at=now if started is None else started, ended_at=now,
                   launcher=launcher)

    @property
    def exit_status(self) -> int:
        """The CLI exit code: the verdict's (see README), or for verdict `error` the job's own exit
        status where it is in JOB_EXIT_STATUSES (never one of the sandbox's codes)."""
        if self.verdict is Verdict.error and self.exit_code in JOB_EXIT_STATUSES:
            return self.exit_code
        return EXIT_CODES[self.verdict]

    def __repr__(self) -> str:
        """One line: job, kernel, verdict, the reason abbreviated, wall time (never the whole record)."""
        return (f"JobResult(job_id={self.job_id!r}, kernel={self.kernel!r}, verdict={self.verdict.value}, "
                f"reason={self._short_reason()!r}, wall={duration(self.usage.wall_seconds)})")

    def __str__(self) -> str:
        """`print(result)`: the same line for people."""
        reason = f": {self._short_reason()}" if self.reason else ""
        return f"{self.kernel}: {self.verdict.value} after {duration(self.usage.wall_seconds)}{reason} (job {self.job_id})"

    def _short_reason(self) -> str:
        return self.reason if len(self.reason) <= 60 else self.reason[:59] + "…"

    def __rich__(self):
        from .display import summary
        return summary(self)

    def _repr_html_(self) -> str:
        from .display import to_html
        return to_html(self)
