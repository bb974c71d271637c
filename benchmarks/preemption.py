"""Bench row: start latency of a high-priority job on a node full of preemptible work.

A real `taichi-sandbox serve` with two slots, both held by a preemptible priority-0 tenant's jobs
that ignore SIGTERM (the worst case: each victim runs out its grace, 1 s, then is killed); a
priority-100 job is submitted and followed. Its latency is from the submission to its own start
(`started_at`); the goal is grace + 1 s.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from sandbox.node import frames

GRACE = 1.0
STUBBORN = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(600)\n"
POLICY = """
[defaults]
memory = "1GiB"
grace = "{grace}s"
[node]
cpu_slots = 2
[tenants.low]
preemptible = true
[tenants.high]
priority = 100
[sandbox]
state_dir = "{state}"
[service]
socket = "{socket}"
request_rate = "unlimited"
drain_timeout = "10ms"
"""


def ask(sock_path: Path, request: dict) -> list[dict]:
    """The service's answers to `request`, up to its `end` (or its first answer when not following)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.connect(str(sock_path))
        frames.send(conn, request)
        answers = [frames.recv(conn, idle=120, within=120)]  # never a silent hang: FrameError past that
        while request.get("follow") and answers[-1]["type"] not in ("end", "error"):
            answers.append(frames.recv(conn, idle=120, within=120))
        return answers


def submit(sock_path: Path, tenant: str, source: str, follow: bool = False) -> list[dict]:
    return ask(sock_path, {"op": "submit", "jobs": [{"kernel": "k.py", "source": source, "tenant": tenant}],
                           "follow": follow, "output": False})


def running(sock_path: Path, count: int) -> None:
    deadline = time.monotonic() + 60
    while sum(j["state"] == "running" for j in ask(sock_path, {"op": "ps"})[0]["jobs"]) < count:
        assert time.monotonic() < deadline, "the preemptible jobs never started"
        time.sleep(0.05)
    time.sleep(0.5)  # their interpreters are up and ignore SIGTERM


def preemption_latency(bench) -> None:
    """Adds the row to `bench` (benchmarks/run.py's Bench)."""
    root = Path(bench.state) / "preemption"
    root.mkdir()
    sock, limits, ready_path = root / "s.sock", root / "limits.toml", root / "notify"
    limits.write_text(POLICY.format(grace=GRACE, state=root / "state", socket=sock))
    ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ready.bind(str(ready_path))
    ready.settimeout(60)
    service = subprocess.Popen([sys.executable, "-m", "sandbox", "serve", "--limits-file", str(limits)],
                               env={**os.environ, "NOTIFY_SOCKET": str(ready_path)}, stderr=subprocess.DEVNULL)
    latencies = []
    try:
        assert ready.recv(64) == b"READY=1"
        for _ in range(max(3, bench.n // 3)):
            for _ in range(2 - len(ask(sock, {"op": "ps"})[0]["jobs"])):  # the victims' replacements
                submit(sock, "low", STUBBORN)
            running(sock, 2)
            asked = time.time()
            answers = submit(sock, "high", "pass\n", follow=True)
            result = [a["result"] for a in answers if a["type"] == "result"][0]
            assert result["verdict"] == "ok", result
            latencies.append(result["started_at"] - asked)
    finally:
        service.terminate()
        service.wait(120)
        ready.close()
    worst = max(latencies)
    bench.add(f"high-priority job on a node full of preemptible work: start latency (s; grace {GRACE:g} s)",
              latencies, worst, f"max ≤ {GRACE + 1:g}", worst <= GRACE + 1, "s")
