"""The result channel is untrusted: garbage, huge messages, pickles and forgeries change nothing."""

from __future__ import annotations

import pytest

from sandbox import JobSpec, Verdict
from sandbox.core.channel import MAX_CHANNEL_BYTES, ChannelReader, ResultMessage

from .conftest import assert_no_survivors

WRITE_TO_EVERY_FD = """
import os, sys
payload = {payload}
for fd in range(3, 256):
    try:
        os.write(fd, payload)
    except OSError:
        pass
os._exit({code})
"""


def _hostile(sup, tmp_path, payload: str, code: int = 0, name: str = "hostile.py"):
    script = tmp_path / name
    script.write_text(WRITE_TO_EVERY_FD.format(payload=payload, code=code))
    r = sup.run(JobSpec(kernel=str(script)))
    assert_no_survivors(sup, r.job_id)
    return r


def test_garbage_on_every_fd_is_a_clear_crash(any_supervisor, tmp_path):
    r = _hostile(any_supervisor, tmp_path, "b'\\\\x00\\\\xff not json {{{\\\\n' * 1000", code=0)
    assert r.verdict is Verdict.crashed
    assert "malformed result channel" in r.reason


def test_pickle_payload_is_never_unpickled(any_supervisor, tmp_path):
    marker = tmp_path / "pwned"
    payload = ("__import__('pickle').dumps(type('E', (), {'__reduce__': lambda s: "
               f"(__import__('os').system, ('touch {marker}',))}})())")
    r = _hostile(any_supervisor, tmp_path, payload)
    assert not marker.exists()
    assert r.verdict is Verdict.crashed


def test_huge_message_is_capped(any_supervisor, tmp_path):
    r = _hostile(any_supervisor, tmp_path, "b'[' * (8 << 20)")
    assert r.verdict is Verdict.crashed
    assert any(f"exceeded {MAX_CHANNEL_BYTES} bytes" in n for n in r.notes)


def test_forged_ok_then_nonzero_exit_is_not_ok(any_supervisor, tmp_path):
    forged = 'b\'{"type": "result", "status": "ok", "result_bytes": 2}\\n\''
    r = _hostile(any_supervisor, tmp_path, forged, code=3)
    assert r.verdict is Verdict.error
    assert r.reason == "exited with status 3 after reporting success"
    assert r.return_value is None


@pytest.mark.parametrize("line", [
    b'{"type": "result", "status": "ok", "extra": 1}',
    b'{"type": "exec", "code": "print(1)"}',
    b'[' * 100000 + b']' * 100000,
    b'{"type": "result", "status": "error", "error_message": "' + b'x' * 10000 + b'"}',
    b'1e999999',
])
def test_reader_rejects_off_schema_messages(line):
    reader = ChannelReader()
    reader.feed(line + b"\n")
    messages, errors = reader.messages()
    assert messages == [] and len(errors) == 1


def test_reader_accepts_valid_result():
    reader = ChannelReader()
    reader.feed(b'{"type": "result", "status": "ok", "result_bytes": 120}\n')
    (message,), errors = reader.messages()
    assert isinstance(message, ResultMessage) and message.result_bytes == 120 and errors == []
