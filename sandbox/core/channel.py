"""The child → supervisor result channel: size-capped JSON lines on a dedicated pipe.

The child is untrusted. The supervisor only ever runs `json.loads` on at most `MAX_CHANNEL_BYTES`
and validates each message against a closed schema; anything else is a protocol error, never code.
"""

from __future__ import annotations

import json
import os
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .values import valid_text

MAX_CHANNEL_BYTES = 1 << 20
MAX_MESSAGES = 64


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TiInitMessage(_Message):
    type: Literal["ti_init"]
    requested: dict[str, str]
    effective: dict[str, Union[str, int, float, bool, None]]
    clamped: list[str] = []


class RlimitMessage(_Message):
    type: Literal["rlimit"]
    resource: Literal["cpu_time", "address_space", "file_size"]
    detail: str = Field(max_length=2000)


class ResultMessage(_Message):
    type: Literal["result"]
    status: Literal["ok", "error"]
    result_bytes: int | None = Field(default=None, ge=0)  # size of the result files (sandbox.job.results)
    exit_code: int = 0
    error_type: str | None = Field(default=None, max_length=200)
    error_message: str | None = Field(default=None, max_length=8000)
    traceback: str | None = Field(default=None, max_length=64000)


class LeftoversMessage(_Message):
    """From the relay outside the job's namespaces (the job could forge one: it only adds a note)."""

    type: Literal["leftovers"]
    count: int = Field(ge=1, le=1 << 22)


Message = Union[TiInitMessage, RlimitMessage, ResultMessage, LeftoversMessage]
_MESSAGE = TypeAdapter(Message)


def send(fd: int, message: dict) -> None:
    """Child side: write one JSON line. Best effort: a closed channel is not the job's failure."""
    data = (json.dumps(message, allow_nan=False) + "\n").encode()
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass


class ChannelReader:
    """Supervisor side: accumulates bytes from the pipe, then parses validated messages."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.overflow = False

    def feed(self, data: bytes) -> None:
        room = MAX_CHANNEL_BYTES - len(self._buf)
        if len(data) > room:
            self.overflow = True
        self._buf += data[:max(room, 0)]

    def messages(self) -> tuple[list[Message], list[str]]:
        """(valid messages in order, protocol errors). Never raises on any input."""
        out: list[Message] = []
        errors: list[str] = []
        if self.overflow:
            errors.append(f"result channel exceeded {MAX_CHANNEL_BYTES} bytes; extra data dropped")
        for number, line in enumerate(bytes(self._buf).split(b"\n"), 1):
            if not line.strip():
                continue
            if len(out) >= MAX_MESSAGES:
                errors.append(f"more than {MAX_MESSAGES} channel messages; rest ignored")
                break
            try:
                out.append(_MESSAGE.validate_python(valid_text(json.loads(line))))
            except (ValueError, RecursionError, ValidationError) as err:
                errors.append(f"invalid channel message {number}: {str(err).splitlines()[0][:200]}")
        return out, errors
