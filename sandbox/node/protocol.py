"""The requests the node service accepts: one JSON object per frame (see `frames`), validated here
against a closed schema before anything acts on it. Replies are plain JSON objects with a `type`:

- submit  → {"type": "submitted", "jobs": [{"job_id", "tenant", "state": queued|rejected|refused, "reason"}]}
            then, with `follow`, for each job "output" {job_id, stream, data}, "sample" {job_id, sample},
            "file" {job_id, name, size} (one output file; its descriptor comes with the frame) and
            "result" {job_id, result, exit_status} frames, and finally {"type": "end"}. A followed job
            whose client goes away is cancelled. While it follows, the client may send `lease` frames
            on the same connection (not answered; an invalid one gets an error frame): the job's
            cluster lease now ends `seconds` from now, `room` being the seconds the lease's
            authority allows for ending it (the service ends the job earlier by what its own grace
            needs more), or was `lost` (why); either way the job's run ends with its lease (verdict
            `crashed`). sandbox.ray sends these for the jobs its tasks run through the service; only
            the client that submitted a job, on its own connection, can.
- ps      → {"type": "ps", "jobs": [{job_id, tenant, user, uid, state, kernel, usage}]}
- cancel  → {"type": "cancelled", "job_id"}
- logs    → "output" frames (with `follow`, until the job ends), then {"type": "end"}
- events  → {"type": "event", "event": {...}} frames (verdicts and alerts) until the client leaves
- quota   → {"type": "quota", "state": {...}} (SandboxExecutor.quota_state)
- any     → {"type": "error", "code", "message"} (one line) when the request cannot be served
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from ..core.errors import describe
from ..core.models import JobSpec
from ..core.values import decode_json_fields

MAX_JOBS_PER_REQUEST = 1000
MAX_SOURCE = 4 << 20
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}\.py")


class ProtocolError(ValueError):
    """A request the service refuses; `code` for the error answer, the message is one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JobRequest(BaseModel):
    """A JobSpec's fields (validated by JobSpec itself), less `job_id`: the service names jobs;
    plus `source`, the kernel file's contents. `tenant` is the one asked for (see auth).

    `inputs` are the names the files get in the job's dir; their open descriptors come with the
    frame, in order (job after job). `outputs` are patterns: the files come back as "file" frames
    (so only with `follow`); `output_dir` is the client's business. The service never opens a path
    a client names."""

    model_config = ConfigDict(extra="allow", frozen=True)

    source: str | None = Field(default=None, max_length=MAX_SOURCE)
    tenant: str | None = Field(default=None, max_length=64)

    def input_names(self) -> list:
        inputs = (self.model_extra or {}).get("inputs", [])
        return inputs if isinstance(inputs, list) else []

    def spec(self, tenant: str | None, number: int, spool: Path) -> JobSpec:
        """The JobSpec for `tenant` (the one authentication chose), named here; its outputs are
        collected into spool/JOB_ID. Raises ConfigError or ProtocolError with a one-line reason."""
        fields = dict(self.model_extra or {})
        if "job_id" in fields:
            raise ProtocolError("BadRequest", f"job {number}: job_id: the service names jobs")
        if "output_dir" in fields:
            raise ProtocolError("BadRequest", f"job {number}: output_dir: the service never writes a client's "
                                              "path; give `outputs` and `follow`, and the files come back")
        if "binds" in fields:
            raise ProtocolError("BadRequest", f"job {number}: binds: the service never binds a client's path into "
                                              "a job; run the job in your own process (run_kernel) to bind one")
        for name in self.input_names():
            if not isinstance(name, str) or name.startswith("/"):
                raise ProtocolError("BadRequest", f"job {number}: inputs: {name!r}: the file's name in the job's "
                                                  "dir, its descriptor sent with the frame, never a path to open")
        job_id = uuid.uuid4().hex[:12]
        try:
            fields = decode_json_fields(fields, ("args", "kwargs"))  # arrays come as tagged JSON (sandbox.core.values)
        except (ValueError, RecursionError) as err:
            raise ProtocolError("BadRequest", f"job {number}: args/kwargs: {str(err)[:200]}") from None
        if self.input_names():  # names, placed as given (never split at '=' or against a cwd)
            fields["inputs"] = [(name, name) for name in self.input_names()]
        spec = JobSpec.parse({**fields, "tenant": tenant, "job_id": job_id,
                              "output_dir": str(spool / job_id) if fields.get("outputs") else None}, f"job {number}")
        target, function = spec.target()
        if spec.shipped is not None:
            pass  # a callable: its code travels in the request, no file to send
        elif self.source is not None:
            if not _FILE_NAME.fullmatch(target):
                raise ProtocolError("BadRequest", f"job {number}: kernel {target!r}: with the file's contents, name "
                                                  "the file only (NAME.py)")
        elif function is None or target.endswith(".py"):
            raise ProtocolError("BadRequest", f"job {number}: kernel {target!r}: send the file's contents; the "
                                              "service never opens a client's path")
        return spec


class Submit(_Request):
    op: Literal["submit"]
    jobs: list[JobRequest] = Field(min_length=1, max_length=MAX_JOBS_PER_REQUEST)
    follow: bool = False  # stream output, usage, output files and verdicts until every job has one
    output: bool = True  # with follow: the jobs' stdout/stderr
    samples: bool = False  # with follow: live usage

    @model_validator(mode="after")
    def _outputs_come_back_to_a_follower(self) -> "Submit":
        if not self.follow and any((job.model_extra or {}).get("outputs") for job in self.jobs):
            raise ValueError("outputs come back on the connection: they need follow")
        return self


class Ps(_Request):
    op: Literal["ps"]


class Cancel(_Request):
    op: Literal["cancel"]
    job_id: str = Field(max_length=64)


class Lease(_Request):
    """Only on a follow connection, for one of its jobs (see the module docstring)."""
    op: Literal["lease"]
    job_id: str = Field(max_length=64)
    seconds: float | None = Field(default=None, ge=0, le=86400)
    room: float = Field(default=0.0, ge=0, le=3600)
    lost: str | None = Field(default=None, max_length=300)

    @model_validator(mode="after")
    def _one_of(self) -> "Lease":
        if (self.seconds is None) == (self.lost is None):
            raise ValueError("give seconds (the lease ends that far from now) or lost (why it is gone), not both")
        return self


class Logs(_Request):
    op: Literal["logs"]
    job_id: str = Field(max_length=64)
    follow: bool = False


class Events(_Request):
    op: Literal["events"]


class Quota(_Request):
    op: Literal["quota"]


Request = Annotated[Union[Submit, Ps, Cancel, Logs, Events, Quota], Field(discriminator="op")]
_REQUEST = TypeAdapter(Request)


def parse(message: dict) -> Submit | Ps | Cancel | Logs | Events | Quota:
    """The validated request, or ProtocolError("BadRequest", one line naming the field)."""
    if isinstance(message, dict) and message.get("op") == "lease":
        raise ProtocolError("BadRequest", "lease: only on the connection that submitted and follows the job")
    try:
        return _REQUEST.validate_python(message)
    except ValidationError as err:
        raise ProtocolError("BadRequest", describe(err)[:300]) from None


def parse_lease(message: dict) -> Lease:
    """A `lease` frame of a follow connection, validated, or ProtocolError("BadRequest", ...)."""
    try:
        return Lease.model_validate(message)
    except ValidationError as err:
        raise ProtocolError("BadRequest", describe(err)[:300]) from None


def error(code: str, message: str) -> dict:
    return {"type": "error", "code": code, "message": message}
