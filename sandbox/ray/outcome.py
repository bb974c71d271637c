"""Every Ray failure as a verdict: what `result()` and RayExecutor make of a task that returned no
JobResult. Nothing here unpickles anything of the job's: Ray's exceptions come from Ray itself (the
task returns its JobResult as JSON)."""

from __future__ import annotations

import re
import time

from ..core.models import JobResult, JobSpec, Verdict


def _plain(text: str) -> str:
    """Without terminal colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _cause(err: BaseException) -> str:
    """`Type: first line` of a Ray exception (of the error a failed task passed on, for a task that
    failed with another's), without terminal colours, at most 300 characters."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        err = cause
    text = next((line.strip() for line in _plain(str(err)).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {text}"[:300] if text else type(err).__name__


def failure_verdict(err: BaseException) -> tuple[Verdict, str]:
    """The verdict and reason for a submitted job whose task ended in `err` (a Ray exception; any
    other exception is `crashed` with its cause)."""
    from .options import _ray
    ex = _ray().exceptions
    cause = _cause(err)
    if isinstance(err, ex.TaskCancelledError):
        return Verdict.cancelled, "cancelled by request (Ray task cancelled)"
    if isinstance(err, ex.RayActorError) or _from_authority(err):  # the only actor a job's task depends on
        return Verdict.rejected, f"admission could not be decided: the quota authority failed ({cause})"
    if isinstance(err, ex.NodeDiedError):
        return Verdict.crashed, f"the node running the job died ({cause})"
    if isinstance(err, ex.OutOfMemoryError):
        return Verdict.crashed, f"Ray's memory monitor killed the worker running the job ({cause})"
    if isinstance(err, (ex.WorkerCrashedError, ex.LocalRayletDiedError)):
        return Verdict.crashed, f"the Ray worker running the job died ({cause})"
    if isinstance(err, (ex.TaskUnschedulableError, ex.ActorUnschedulableError)):
        return Verdict.rejected, f"Ray cannot place the job on any node ({cause})"
    if isinstance(err, ex.ObjectLostError):
        return Verdict.crashed, f"the job's result was lost with its node or owner ({cause})"
    return Verdict.crashed, f"the Ray task failed ({cause})"


def _from_authority(err: BaseException) -> bool:
    """Whether `err` is an error the authority's own call raised (passed on to the job's task, whose
    argument that call's result is)."""
    from .actor import AuthorityActor
    from .options import _ray
    if not isinstance(err, _ray().exceptions.RayTaskError):
        return False
    name = getattr(err, "function_name", None) or _plain(str(err)).strip().split("(", 1)[0]  # "ray::Class.method"
    return f"{AuthorityActor.__name__}." in name


def failed_result(spec: dict, err: BaseException) -> JobResult:
    """A JobResult for a job whose task failed with `err`; `spec`: job_id, kernel, arch, labels."""
    verdict, reason = failure_verdict(err)
    now = time.time()
    return JobResult(**spec, verdict=verdict, started_at=now, ended_at=now, reason=reason)


def granted(spec: JobSpec, grant: dict, started: float) -> JobResult | None:
    """None when the authority's answer `grant` lets the job start; else the job's verdict."""
    if "refused" in grant:
        return JobResult.not_run(spec, Verdict.rejected, f"the quota authority refused the job: {grant['refused']}",
                                 started)
    if "lost" in grant:
        return JobResult.not_run(spec, Verdict.rejected, f"the job's lease ended before it could start: {grant['lost']}",
                                 started)
    return None
