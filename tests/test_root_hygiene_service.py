"""Results the root service holds for clients that do not read them (issue 19, class 10).

A followed job's return value waits in the service until its client reads it. Clients that submit
jobs returning large arrays and never read made the service hold each value and its encoded frame
(several copies) until `request_timeout`: memory any uid could grow without bound. Now a result is
counted against its uid's `[service] max_held_bytes_per_uid` before the service even reads it, and
sent in pieces as the client takes them; one that cannot be held ends with verdict `result` saying
why. A real service process on a real socket, clients of other uids (see test_service).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from .test_service import BOB, MALLORY, SOCKET_GID, Node, as_uid

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run clients as other uids")

MiB = 1 << 20
ARRAY = 30 * MiB
CAP = 80 * MiB  # two of these results, not three
POLICY = """
[defaults]
memory = "1GiB"
[node]
cpu_slots = 4
[tenants.default]
max_concurrent = 4
[tenants.bob]
users = ["{bob}"]
[sandbox]
state_dir = "{state}"
[service]
socket = "{socket}"
group = "{gid}"
request_timeout = "60s"  # a client that stops reading is dropped only after this: it holds until then
max_held_bytes_per_uid = "{cap}"
"""
SOURCE = "import numpy as np\ndef main(n):\n    return np.arange(n, dtype=np.float64)\n"
HOARD = """
import json, socket, sys, time
from sandbox.node import frames
s = socket.socket(socket.AF_UNIX)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.connect(sys.argv[1])
frames.send(s, {"op": "submit", "follow": True, "output": False,
                "jobs": [{"kernel": "big.py:main", "source": sys.argv[2], "args": [int(sys.argv[3])]}]})
print(json.dumps(frames.recv(s, idle=60, within=60)), flush=True)
time.sleep(120)  # and never read again
"""
READ = """
import json, socket, sys
import numpy as np
from sandbox.core.models import JobResult
from sandbox.node import frames
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
frames.send(s, {"op": "submit", "follow": True, "output": False,
                "jobs": [{"kernel": "big.py:main", "source": sys.argv[2], "args": [int(sys.argv[3])]}]})
while (answer := frames.recv(s, idle=120, within=120))["type"] != "result":
    pass
result = JobResult.model_validate_json(json.dumps(answer["result"]))
value = result.return_value
print(json.dumps({"verdict": result.verdict.value, "reason": result.reason,
                  "exact": isinstance(value, np.ndarray) and bool((value == np.arange(int(sys.argv[3]))).all())}))
"""


class HoldingNode(Node):
    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        self.root, self.socket, self.limits, self.prefix = root, root / "s.sock", root / "limits.toml", ()
        self.limits.write_text(POLICY.format(bob=BOB, state=root / "state", socket=self.socket, gid=SOCKET_GID, cap=CAP))
        self.audit = root / "state" / "audit.jsonl"
        self.start()


def _read_as(node: Node, uid: int, n: int) -> dict:
    done = subprocess.run(as_uid(uid, "-c", READ, str(node.socket), SOURCE, str(n)), capture_output=True,
                          text=True, timeout=120, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def _verdicts(node: Node, job_ids: list[str], timeout: float = 90) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        done = {r["job_id"]: r for r in node.records("job") if r["job_id"] in job_ids}
        if len(done) == len(job_ids):
            return done
        assert time.monotonic() < deadline, f"no verdict for {set(job_ids) - set(done)}"
        time.sleep(0.2)


@pytest.mark.slow
def test_clients_that_never_read_their_large_results_cannot_grow_the_service_past_their_cap(tmp_path):
    node = HoldingNode(tmp_path / "node")
    hoarders = []
    try:
        assert _read_as(node, BOB, 1000)["exact"]  # the service has loaded everything a result needs
        service = psutil.Process(node.proc.pid)
        baseline = service.memory_info().rss
        for _ in range(4):
            hoarders.append(subprocess.Popen(as_uid(MALLORY, "-c", HOARD, str(node.socket), SOURCE, str(ARRAY // 8)),
                                             stdout=subprocess.PIPE, text=True, cwd="/"))
        job_ids = [json.loads(h.stdout.readline())["jobs"][0]["job_id"] for h in hoarders]
        verdicts = _verdicts(node, job_ids)
        time.sleep(2)  # the followers' threads send what they hold
        grown = service.memory_info().rss - baseline
        held = [v for v in verdicts.values() if v["verdict"] == "ok"]
        unheld = [v for v in verdicts.values() if v["verdict"] != "ok"]
        assert grown < CAP + 40 * MiB, f"the service grew {grown / MiB:.0f} MiB for {len(held)} unread results"
        assert len(held) * ARRAY <= CAP and len(unheld) >= 4 - CAP // ARRAY, verdicts
        for v in unheld:
            assert v["verdict"] == "result", v
            assert "max_held_bytes_per_uid" in v["reason"] and "unread" in v["reason"], v["reason"]
        for h in hoarders:  # the clients leave: what they held is given back
            h.kill()
            h.wait()
        time.sleep(1)
        again = _read_as(node, MALLORY, ARRAY // 8)
        assert again["verdict"] == "ok" and again["exact"], again
    finally:
        for h in hoarders:
            h.kill()
            h.wait()
        assert node.stop() == 0
