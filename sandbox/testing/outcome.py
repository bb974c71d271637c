"""A sandboxed test's JobResult back into pytest's terms, on pytest's side, from the result's data
only (exception type name, message and traceback text; nothing of the job is unpickled).

- A skip or xfail the test raised in the job (sandbox.testing.job) is raised here.
- A test that raised is a failure reported like pytest's: the job's traceback (the sandbox's own
  frames left out), the exception as `E` lines, and in the short summary the exception (for a
  rewritten assert, `assert 1 == 2`). A builtin exception type stays that type (`JobFailure`
  subclass), so `xfail(raises=...)` keeps working.
- Any other verdict (a limit, a crash, a rejected job) is a failure that names it.
"""

from __future__ import annotations

import builtins
import functools
import os
import re
from dataclasses import dataclass

import _pytest
import pytest

from ..core.models import JobResult, Verdict

_FRAME = re.compile(r'^  File "(?P<path>.*)", line (?P<line>\d+)')
# Frames of the sandbox package and of pytest's outcome functions, left out as pytest leaves out its own.
_OWN = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep, os.path.dirname(_pytest.__file__) + os.sep)


@dataclass
class Crash:
    """Where and how the test failed, as pytest's `reprcrash` (short summary, junitxml)."""

    path: str
    lineno: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.lineno}: {self.message}"


@dataclass
class JobRepr:
    """A failure's report (`TestReport.longrepr`): the text, and the crash."""

    text: str
    reprcrash: Crash

    def toterminal(self, tw) -> None:
        for line in self.text.splitlines():
            tw.line(line, red=line.startswith("E "), bold=line.startswith("E "))

    def __str__(self) -> str:
        return self.text


class JobFailure(Exception):
    """A sandboxed test failed in its job; `sandbox_longrepr` is its report."""

    def __init__(self, longrepr: JobRepr) -> None:
        super().__init__(longrepr.reprcrash.message)
        self.sandbox_longrepr = longrepr


@functools.cache
def _failure_type(name: str | None) -> type[JobFailure]:
    """JobFailure, also a subclass of the builtin exception `name` where there is one."""
    base = getattr(builtins, name or "", None)
    if isinstance(base, type) and issubclass(base, Exception):
        try:
            return type(name, (JobFailure, base), {})
        except TypeError:  # a builtin whose layout cannot be combined
            pass
    return JobFailure


def _split(traceback: str) -> tuple[list[str], list[str]]:
    """(the frames outside the sandbox package, the exception lines) of a job's traceback text."""
    lines = traceback.rstrip().splitlines()
    frames = [i for i, line in enumerate(lines) if _FRAME.match(line)]
    if not frames:
        return [], lines
    end = frames[-1] + 1
    while end < len(lines) and lines[end].startswith("    "):
        end += 1
    kept, own = [], False
    for line in lines[:end]:
        match = _FRAME.match(line)
        if match:
            own = match["path"].startswith(_OWN)
        elif not line.startswith("    "):
            own = False
        if not own and line != "Traceback (most recent call last):":
            kept.append(line)
    return kept, lines[end:]


def _crash(frames: list[str], item: pytest.Function, message: str) -> Crash:
    for line in reversed(frames):
        match = _FRAME.match(line)
        if match:
            return Crash(match["path"], int(match["line"]), message)
    path, lineno, _ = item.reportinfo()
    return Crash(str(path), (lineno or 0) + 1, message)


def raise_outcome(result: JobResult, item: pytest.Function) -> None:
    """Raise the test's pytest outcome; return when it passed."""
    value = result.return_value if result.ok else None
    if isinstance(value, dict) and value.get("outcome") == "skipped":
        raise pytest.skip.Exception(str(value.get("message", "")), _use_item_location=True)
    if isinstance(value, dict) and value.get("outcome") == "xfailed":
        pytest.xfail(str(value.get("message", "")))
    if result.ok:
        return
    where = f"sandbox job {result.job_id}: verdict {result.verdict.value}"
    if result.verdict is Verdict.error and result.error_type:
        frames, exception = _split(result.traceback or f"{result.error_type}: {result.error_message}")
        message = result.error_message or ""
        if not (result.error_type == "AssertionError" and message.startswith("assert ")):
            message = f"{result.error_type}: {message}"
        text = [f"{where} (the test's traceback in the job):", *frames, *(f"E   {line}" for line in exception)]
        raise _failure_type(result.error_type)(JobRepr("\n".join(text), _crash(frames, item, message)))
    lines = [f"sandbox verdict {result.verdict.value}: {result.reason}"]
    lines += [f"  violation: {v.resource} {v.observed:g} > {v.limit:g} ({v.detected_by}, {v.action})"
              for v in result.violations if v.action != "warn"]
    frames, exception = _split(result.traceback or "")
    if frames or exception:
        lines += [f"{where}; the job's traceback:", *frames, *(f"E   {line}" for line in exception)]
    raise JobFailure(JobRepr("\n".join(lines), _crash(frames, item, lines[0])))
