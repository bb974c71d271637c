"""The warm server (sandbox.warm): a run through it is the in-process CLI's run (verdicts, exit
codes, summaries, files, signals), it ends with its client, it exits when idle, and no one else
can use or hijack it. Each test has its own socket directory."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from sandbox.warm import HEADER, stamp
from sandbox.warm.client import servers

from . import test_cli_run
from .conftest import ROOT, kernel

# The CLI's client with sandbox.cli unimportable: only a run handed to a warm worker can succeed.
WARM_ONLY = ("import sys; sys.modules['sandbox.cli'] = None; sys.argv[0] = 'taichi-sandbox'; "
             "from sandbox.client import main; main()")


@pytest.fixture
def warm(tmp_path):
    """The environment of a client with its own warm-server directory; its servers stop afterwards."""
    directory = tempfile.mkdtemp(prefix="tsw-")  # short: a socket path has at most 107 bytes
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path), "TAICHI_SANDBOX_LIMITS": str(ROOT / "limits.toml"),
           "TAICHI_SANDBOX_WARM": "1", "TAICHI_SANDBOX_WARM_DIR": directory}
    start = subprocess.run([sys.executable, "-m", "sandbox", "warm", "start"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=60)
    assert start.returncode == 0 and "running: warm server" in start.stdout, start
    yield env
    found = servers(directory) if os.path.isdir(directory) else []
    for pid, _ in found:
        os.kill(pid, signal.SIGTERM)
    for pid, _ in found:
        _gone(pid)
    shutil.rmtree(directory, ignore_errors=True)


def _gone(pid: int, timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


def run(env: dict, tmp_path: Path, *args: str, warm_only: bool = True, **kw) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", WARM_ONLY] if warm_only else [sys.executable, "-m", "sandbox"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120, **kw)


def cold(env: dict, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return run({**env, "TAICHI_SANDBOX_WARM": "0"}, tmp_path, *args, warm_only=False)


def write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return name


def _summary(stderr: str) -> list[str]:
    """The summary's lines that do not vary between two runs of a job, less the figures observed."""
    return [re.sub(r"observed .*", "", line) for line in stderr.splitlines() if line.startswith(("verdict:", "policy:"))]


@pytest.mark.parametrize("name,args,code", [
    ("tiny.py", [], 0),
    ("exception.py", [], 1),
    pytest.param("cpu_hog.py", ["--cpu-time", "1s"], 123, marks=pytest.mark.slow),  # the longest: a limit verdict
])
def test_a_warm_run_is_the_in_process_run(warm, tmp_path, name, args, code):
    script = shutil.copy(kernel(name), tmp_path / name)
    hot, cool = run(warm, tmp_path, "run", script, *args), cold(warm, tmp_path, "run", script, *args)
    assert hot.returncode == cool.returncode == code, (hot.stderr, cool.stderr)
    assert hot.stdout == cool.stdout and _summary(hot.stderr) == _summary(cool.stderr)
    assert ("Traceback" in hot.stderr) == ("Traceback" in cool.stderr)  # the job's own, when it raised
    hot, cool = (json.loads(p.stdout) for p in (run(warm, tmp_path, "run", script, *args, "--json"),
                                                 cold(warm, tmp_path, "run", script, *args, "--json")))
    for key in ("verdict", "exit_code", "signal", "error_type", "limits", "rlimits", "enforcement", "launcher"):
        assert hot[key] == cool[key], key
    assert len(servers(warm["TAICHI_SANDBOX_WARM_DIR"])) == 1


def test_usage_errors_and_files_are_the_in_process_ones(warm, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "init.txt").write_text("41")
    job = write(tmp_path, "job.py", "n = int(open('data/init.txt').read())\nopen('out.txt', 'w').write(str(n + 1))\n")
    for mode, out in ((run, "hot"), (cold, "cool")):
        p = mode(warm, tmp_path, "run", job, "--input", "data/init.txt", "--output-dir", out)
        assert p.returncode == 0, p.stderr
        assert (tmp_path / out / "out.txt").read_text() == "42"
    hot, cool = (mode(warm, tmp_path, "run", job, "--memory", "lots") for mode in (run, cold))
    assert hot.returncode == cool.returncode == 2 and hot.stderr == cool.stderr


def _forkservers(state: Path) -> list[psutil.Process]:
    """The fork-servers whose audit log is under `state` (this test's)."""
    found = []
    for proc in psutil.process_iter():
        try:
            command = proc.cmdline()
            if "sandbox.job.forkserver" in command and any(a.startswith(str(state)) for a in command):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _jobs(state: Path) -> list[psutil.Process]:
    """The job processes under those fork-servers; not a fork-server itself (a spare, detaching
    from its starter), which runs in its own home."""
    found = []
    for server in _forkservers(state):
        try:
            found += [p for p in server.children(recursive=True) if "tsbx-fs-" not in p.cwd()]
        except psutil.Error:
            continue
    return found


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_on_a_warm_run_are_the_in_process_ones(warm, tmp_path, monkeypatch, signum, code):
    for name in ("TAICHI_SANDBOX_WARM", "TAICHI_SANDBOX_WARM_DIR"):
        monkeypatch.setenv(name, warm[name])  # the in-process CLI's test, run against the warm server
    [spare] = _forkservers(tmp_path)
    test_cli_run.test_signal_on_run_cancels_the_job_prints_and_audits_it(tmp_path, signum, code)
    assert _gone(spare.pid)  # the run took the warm server's spare (and closed it): it ran there


def _workers(server: int) -> list[psutil.Process]:
    found = []
    for proc in psutil.Process(server).children():
        try:
            if "sandbox.warm.server" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.ZombieProcess:
            found.append(proc)  # ended, not yet reaped
        except psutil.Error:
            continue
    return found


def test_a_client_killed_mid_job_takes_its_worker_and_job_with_it(warm, tmp_path):
    job = write(tmp_path, "slow.py", "import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", WARM_ONLY, "run", job], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=warm, cwd=tmp_path)
    try:
        assert proc.stdout.readline() == "started\n"
        [(server, _)] = servers(warm["TAICHI_SANDBOX_WARM_DIR"])
        workers, jobs = _workers(server), _jobs(tmp_path)
        assert len(workers) == 1 and jobs
    finally:
        proc.kill()
        proc.communicate()
    assert all(_gone(p.pid) for p in [*workers, *jobs])
    deadline = time.monotonic() + 10
    while _workers(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _workers(server) == []  # nothing of the run is left; the server waits for the next


def test_a_run_without_a_server_runs_in_process_and_starts_one(warm, tmp_path):
    directory = warm["TAICHI_SANDBOX_WARM_DIR"]
    subprocess.run([sys.executable, "-m", "sandbox", "warm", "stop"], env=warm, check=True, capture_output=True)
    deadline = time.monotonic() + 30
    while servers(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    first = run(warm, tmp_path, "run", kernel("tiny.py"), warm_only=False)
    assert first.returncode == 0, first.stderr
    while not servers(directory) and time.monotonic() < deadline + 30:
        time.sleep(0.05)
    assert run(warm, tmp_path, "run", kernel("tiny.py")).returncode == 0  # through the new one


def test_the_server_exits_when_idle(warm, tmp_path):
    directory = warm["TAICHI_SANDBOX_WARM_DIR"]
    subprocess.run([sys.executable, "-m", "sandbox", "warm", "stop"], env=warm, check=True, capture_output=True)
    env = {**warm, "TAICHI_SANDBOX_WARM_IDLE": "1"}
    deadline = time.monotonic() + 30
    while servers(directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    start = subprocess.run([sys.executable, "-m", "sandbox", "warm", "start"], env=env, check=True,
                           capture_output=True, text=True)
    found = re.fullmatch(r"running: warm server (\d+) \((.*)\)\n", start.stdout)  # it may be gone already
    assert found, start.stdout
    assert _gone(int(found[1]), 20)
    assert not os.path.exists(found[2])


def test_warm_stop_and_the_switch(warm, tmp_path):
    assert run(warm, tmp_path, "run", kernel("tiny.py")).returncode == 0
    [(pid, _)] = servers(warm["TAICHI_SANDBOX_WARM_DIR"])
    p = subprocess.run([sys.executable, "-m", "sandbox", "warm", "stop"], capture_output=True, text=True, env=warm)
    assert p.returncode == 0 and f"stopped: warm server {pid}" in p.stdout and _gone(pid)
    off = run({**warm, "TAICHI_SANDBOX_WARM": "0"}, tmp_path, "run", kernel("tiny.py"))
    assert off.returncode == 1 and servers(warm["TAICHI_SANDBOX_WARM_DIR"]) == []  # in-process: no sandbox.cli


def _connect(path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(20)
    conn.connect(path)
    return conn


def test_a_malformed_request_gets_one_line_and_the_server_serves_on(warm, tmp_path):
    assert run(warm, tmp_path, "run", kernel("tiny.py")).returncode == 0
    [(_, name)] = servers(warm["TAICHI_SANDBOX_WARM_DIR"])
    path = os.path.join(warm["TAICHI_SANDBOX_WARM_DIR"], f"{name}.sock")
    for data, fds in ((b"garbage", []), (HEADER.pack(5) + b"{1: 2", [0, 1, 2, 0]),
                      (HEADER.pack(2) + b"{}", [0, 1, 2, 0]), (HEADER.pack(1 << 30), [0, 1, 2, 0])):
        with _connect(path) as conn:
            socket.send_fds(conn, [data], fds)
            answer = conn.makefile("rb").read()
        assert answer.startswith(b"cold ") and answer.count(b"\n") == 1, answer
    assert run(warm, tmp_path, "run", kernel("tiny.py")).returncode == 0


SYSTEM_PYTHON = "/usr/bin/python3"  # one a second uid may run (the venv's may sit under a 0700 home)
root_only = pytest.mark.skipif(os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
                               reason="needs root and /usr/bin/python3 to act as a second uid")
NOBODY = 65534


@root_only
def test_another_uid_cannot_reach_the_server_nor_be_served(warm, tmp_path):
    assert run(warm, tmp_path, "run", kernel("tiny.py")).returncode == 0
    directory = warm["TAICHI_SANDBOX_WARM_DIR"]
    [(_, name)] = servers(directory)
    path = os.path.join(directory, f"{name}.sock")
    attempt = ("import socket, sys\ns = socket.socket(socket.AF_UNIX)\ns.settimeout(20)\n"
               "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print('refused', e.errno); sys.exit()\n"
               "try:\n    print('answer', s.recv(100))\nexcept ConnectionResetError:\n    print(\"answer b''\")\n")
    p = subprocess.run([SYSTEM_PYTHON, "-I", "-c", attempt, path], capture_output=True, text=True, user=NOBODY,
                       group=NOBODY, extra_groups=[], cwd="/", timeout=60)
    assert p.stdout.startswith("refused 13"), p  # EACCES: the directory is private
    os.chmod(directory, 0o755)  # as if the owner opened it up: the server still serves only its uid
    os.chmod(path, 0o777)
    try:
        p = subprocess.run([SYSTEM_PYTHON, "-I", "-c", attempt, path], capture_output=True, text=True, user=NOBODY,
                           group=NOBODY, extra_groups=[], cwd="/", timeout=60)
        assert p.stdout.strip() == "answer b''", p  # closed without a word or a worker
        opened = run(warm, tmp_path, "run", kernel("tiny.py"))  # and our client will not use it
        assert opened.returncode == 1 and "sandbox.cli" in opened.stderr
    finally:
        os.chmod(directory, 0o700)


@root_only
@pytest.mark.parametrize("trap", ["symlink", "foreign"])
def test_a_socket_directory_planted_by_another_uid_is_not_used(warm, tmp_path, trap):
    planted = Path(tempfile.mkdtemp(prefix="tsw-trap-"))
    directory = Path(warm["TAICHI_SANDBOX_WARM_DIR"]) / "planted"
    if trap == "symlink":
        directory.symlink_to(planted)
    else:
        directory.mkdir(0o700)
        os.chown(directory, NOBODY, NOBODY)
    env = {**warm, "TAICHI_SANDBOX_WARM_DIR": str(directory)}
    try:
        p = run(env, tmp_path, "run", kernel("tiny.py"), warm_only=False)
        assert p.returncode == 0, p.stderr  # in-process
        assert run(env, tmp_path, "run", kernel("tiny.py")).returncode == 1  # not warm
        assert os.listdir(planted) == [] and (trap == "symlink" or os.listdir(directory) == [])
        assert stat.S_ISLNK(os.lstat(directory).st_mode) == (trap == "symlink")
    finally:
        shutil.rmtree(planted)


def test_the_stamp_follows_the_installed_code():
    path = ROOT / "sandbox" / "warm" / "__init__.py"
    before, info = stamp(), os.stat(path)
    try:
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 1))
        assert stamp() != before
    finally:
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert stamp() == before


@root_only
def test_a_client_with_other_groups_is_not_served_by_a_server_with_these(warm, tmp_path):
    assert run(warm, tmp_path, "run", kernel("tiny.py")).returncode == 0
    extra = next(gid for gid in range(5, 1000) if gid not in os.getgroups())
    other = run(warm, tmp_path, "run", kernel("tiny.py"), extra_groups=[*os.getgroups(), extra])
    assert other.returncode == 1 and "sandbox.cli" in other.stderr  # not warm: in-process, which WARM_ONLY forbids


def test_a_client_in_a_ray_drivers_environment_is_served_warm(warm, tmp_path):
    """Ray's driver sets PYTHONBREAKPOINT in its own environment (tests that ran Ray leave it in
    the suite's): it acts only in breakpoint(), so it does not send a run in-process."""
    env = {**warm, "PYTHONBREAKPOINT": "ray.util.rpdb._driver_set_trace"}
    assert run(env, tmp_path, "run", kernel("tiny.py")).returncode == 0
