"""The cold-start rows: `taichi-sandbox run tiny.py` typed in a shell ÷ `python tiny.py`.

Each run is a new process started from an idle moment (a pause before each, as a person types
commands); the CLI's and plain Python's runs alternate, so drift on a shared machine hits both
alike. The CLI runs through a warm server of its own (sandbox.warm, in a private socket
directory): the first run (in-process, starting the server) is reported on its own; then also
in-process throughout (TAICHI_SANDBOX_WARM=0), as before the warm server.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PAUSE = 1.0  # seconds of idle before each timed run


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "taichi-sandbox"
    return [str(script)] if script.exists() else [sys.executable, "-m", "sandbox"]


def _timed(command: list[str], env: dict[str, str], cwd: str) -> float:
    time.sleep(PAUSE)
    t = time.perf_counter()
    subprocess.run(command, env=env, cwd=cwd, capture_output=True, check=True)
    return time.perf_counter() - t


def measure(tiny: str, plain_env: dict[str, str], state: str, n: int) -> list[tuple]:
    """Rows (name, samples, value, goal, pass) for the bench table."""
    env = {**os.environ, "XDG_STATE_HOME": state, "TAICHI_SANDBOX_WARM": "1",
           "TAICHI_SANDBOX_WARM_DIR": os.path.join(state, "warm")}
    cli = [*_cli(), "run", tiny]
    plain_cmd = [sys.executable, tiny]
    first = _timed(cli, env, state)
    deadline = time.monotonic() + 60
    while b"running" not in subprocess.run([*_cli(), "warm", "status"], env=env, capture_output=True).stdout:
        if time.monotonic() > deadline:
            raise RuntimeError("the first run started no warm server")
        time.sleep(0.1)
    warm, plain, cold = [], [], []
    try:
        for _ in range(n):
            warm.append(_timed(cli, env, state))
            plain.append(_timed(plain_cmd, plain_env, state))
            cold.append(_timed(cli, {**env, "TAICHI_SANDBOX_WARM": "0"}, state))
    finally:
        subprocess.run([*_cli(), "warm", "stop"], env=env, capture_output=True)
    base = statistics.median(plain)
    ratio = statistics.median(warm) / base
    return [("CLI run from a shell (warm server) ÷ plain python", warm, ratio, "≤ 1.0", ratio <= 1.0),
            ("... its first run, which starts the server, ÷ plain", [first], first / base, "report", None),
            ("... in-process (TAICHI_SANDBOX_WARM=0) ÷ plain", cold, statistics.median(cold) / base, "report", None),
            ("plain `python tiny.py` (s)", plain, base, "report", None)]
