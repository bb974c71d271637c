"""The job's output live on the caller's sys.stdout/sys.stderr: `run_kernel`, `@sandboxed`, executor
futures (real jobs; pytest's capture and stand-in streams as the caller's)."""

from __future__ import annotations

import io
import textwrap
import threading
import time

import pytest

from sandbox import JobSpec, Verdict, run_kernel, sandboxed
from sandbox.node.executor import SandboxExecutor
from sandbox.watch.echo import Echo


class Arrivals(io.TextIOBase):
    """A text stream that records when each piece of text arrived; `gate` (when given) holds every
    write until it is set (a terminal nobody reads)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.writes: list[tuple[float, str]] = []
        self.gate = gate

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.gate is not None:
            self.gate.wait()
        self.writes.append((time.monotonic(), text))
        return len(text)

    @property
    def text(self) -> str:
        return "".join(t for _, t in self.writes)


def script(tmp_path, body: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


PROGRESS = """
    import sys, time
    for i in range(4):
        print(f"step {i}")
        print(f"note {i}", file=sys.stderr)
        time.sleep(0.4)
"""


def test_progress_arrives_while_the_job_runs(supervisor, tmp_path, monkeypatch):
    out, err = Arrivals(), Arrivals()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    result = run_kernel(script(tmp_path, PROGRESS), supervisor=supervisor)
    returned = time.monotonic()
    assert result.verdict is Verdict.ok
    assert out.text == "".join(f"step {i}\n" for i in range(4))
    assert err.text == "".join(f"note {i}\n" for i in range(4))
    # the first lines were printed >= 1.2 s before the job ended: seen long before run_kernel returned
    assert returned - out.writes[0][0] > 1.0
    assert returned - err.writes[0][0] > 1.0
    assert result.stdout_tail == out.text  # the tails are kept as before


def test_capsys_captures_the_jobs_output(supervisor, tmp_path, capsys):
    result = run_kernel(script(tmp_path, PROGRESS), supervisor=supervisor)
    captured = capsys.readouterr()
    assert result.verdict is Verdict.ok
    assert captured.out == "".join(f"step {i}\n" for i in range(4))
    assert captured.err == "".join(f"note {i}\n" for i in range(4))


def test_quiet_prints_nothing(supervisor, tmp_path, capsys):
    result = run_kernel(script(tmp_path, PROGRESS), supervisor=supervisor, quiet=True)
    assert capsys.readouterr() == ("", "")
    assert "step 3" in result.stdout_tail and "note 3" in result.stderr_tail


def test_invalid_and_split_utf8(supervisor, tmp_path, capsys):
    body = """
        import sys, time
        out = sys.stdout.buffer
        out.write(b"caf\\xc3"); out.flush(); time.sleep(0.3)  # the 2-byte character split across reads
        out.write(b"\\xa9 \\xff|"); out.flush(); time.sleep(0.3)  # an invalid byte
        out.write(b"end \\xe2\\x82")  # half of a 3-byte character, then the job ends
    """
    result = run_kernel(script(tmp_path, body), supervisor=supervisor)
    assert result.verdict is Verdict.ok
    assert capsys.readouterr().out == "caf\u00e9 \ufffd|end \ufffd"


@sandboxed(cpu_time="20s")
def chatty(n: int) -> int:
    import sys
    print(f"working on {n}")
    print("careful", file=sys.stderr)
    return n * 2


@sandboxed(quiet=True)
def hushed(n: int) -> int:
    print(f"working on {n}")
    return n


def test_sandboxed_functions_print(capsys, monkeypatch, tmp_path, supervisor):
    monkeypatch.setattr("sandbox.api.default_supervisor", lambda: supervisor)
    assert chatty(21) == 42
    out, err = capsys.readouterr()
    assert out.endswith("working on 21\n") and err == "careful\n"  # after Taichi's "[Taichi] Starting on ..."
    assert hushed(1) == 1
    assert capsys.readouterr() == ("", "")


def test_executor_futures_print_unless_quiet(supervisor, tmp_path, capsys):
    path = script(tmp_path, PROGRESS)
    with SandboxExecutor(max_concurrent=2, supervisor=supervisor) as ex:
        loud, quiet = ex.submit(JobSpec(kernel=path)), ex.submit(JobSpec(kernel=path), quiet=True)
        assert loud.result().verdict is Verdict.ok and quiet.result().verdict is Verdict.ok
    captured = capsys.readouterr()
    assert captured.out == "".join(f"step {i}\n" for i in range(4))
    assert captured.err == "".join(f"note {i}\n" for i in range(4))


def test_a_stalled_stream_never_holds_up_the_supervisor(supervisor, tmp_path, monkeypatch):
    """Nobody reads the caller's stdout: the job still ends at its output limit, the result comes
    back after at most Echo.DRAIN, and what did not fit the backlog is announced once it drains."""
    gate = threading.Event()
    out = Arrivals(gate)
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr(Echo, "DRAIN", 0.5)
    monkeypatch.setattr(Echo, "BACKLOG", 1 << 20)
    flood = script(tmp_path, """
        import sys
        block = ("x" * 1023 + "\\n") * 1024
        while True:
            sys.stdout.write(block)
    """)
    started = time.monotonic()
    result = run_kernel(flood, limits={"max_output": "32MiB", "wall_time": "20s"}, supervisor=supervisor)
    assert result.verdict is Verdict.output
    assert time.monotonic() - started < 15
    gate.set()
    deadline = time.monotonic() + 10
    while "not shown" not in out.text and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "bytes of the job's stdout not shown" in out.text
    assert len(out.text) < (1 << 20) + (128 << 10)  # the backlog, the chunk in hand, the notice


class Broken(io.TextIOBase):
    def write(self, text: str) -> int:
        raise ValueError("I/O operation on closed file")


def test_a_broken_callers_stream_loses_the_echo_not_the_verdict(supervisor, tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdout", Broken())
    result = run_kernel(script(tmp_path, PROGRESS), supervisor=supervisor)
    assert result.verdict is Verdict.ok and "step 3" in result.stdout_tail


def test_in_a_notebook_the_output_appears_in_the_cell_that_ran_the_job(tmp_path, state_dir):
    """A real Jupyter kernel (ipykernel, driven by nbclient): the job's lines are the running cell's
    stream outputs, not the next cell's."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    path = script(tmp_path, PROGRESS)
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(
            "from sandbox import Policy, Supervisor, run_kernel\nfrom sandbox.core.limits import Settings\n"
            f"sup = Supervisor(Policy(settings=Settings(state_dir={str(state_dir / 'notebook')!r})))\n"
            f"result = run_kernel({path!r}, supervisor=sup)"),
        nbformat.v4.new_code_cell("print('next cell', result.verdict.value)\nsup.close()"),
    ])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    streams = [{name: "".join(o["text"] for o in cell.outputs if o.get("name") == name) for name in ("stdout", "stderr")}
               for cell in nb.cells]
    assert streams[0] == {"stdout": "".join(f"step {i}\n" for i in range(4)),
                          "stderr": "".join(f"note {i}\n" for i in range(4))}
    assert streams[1] == {"stdout": "next cell ok\n", "stderr": ""}
