"""Soak: 500 mixed jobs (ok, error, crash and every host limit) at concurrency 2 through one supervisor.

Afterwards: exactly one audit job record per job, no leaked processes, descriptors, threads or temp
dirs in the supervisor (measured before/after), and its RSS flat after warm-up.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from sandbox import JobSpec, Limits, Supervisor, Verdict

from .conftest import kernel, make_policy

MIX = [
    ("tiny.py", {}, Verdict.ok),
    ("exception.py", {}, Verdict.error),
    ("segfault.py", {}, Verdict.crashed),
    ("cpu_hog.py", {"cpu_time": "0.3s"}, Verdict.cpu_time),
    ("sleeper.py", {"wall_time": "0.4s"}, Verdict.wall_time),
    ("memory_hog.py", {"memory": "200MiB"}, Verdict.memory),
    ("output_flood.py", {"max_output": "1MiB"}, Verdict.output),
    ("spawner.py", {"max_processes": 3, "wall_time": "20s"}, Verdict.processes),
]
JOBS = 500


def _temp_dirs(job_ids) -> set[str]:
    """The private directories of these jobs still on disk (other test runs on the machine have theirs)."""
    return {d for d in glob.glob(os.path.join(tempfile.gettempdir(), "tsbx-*"))
            if os.path.basename(d).split("-")[1] in job_ids}


@pytest.mark.soak
def test_soak_500_mixed_jobs(tmp_path):
    me = psutil.Process()
    audit = tmp_path / "audit.jsonl"
    with Supervisor(make_policy(tmp_path), audit_log=audit) as sup:
        specs = [JobSpec(kernel=kernel(MIX[i % len(MIX)][0]), limits=Limits(grace="0.5s", **MIX[i % len(MIX)][1]))
                 for i in range(JOBS)]
        expected = {s.job_id: MIX[i % len(MIX)][2] for i, s in enumerate(specs)}
        with ThreadPoolExecutor(max_workers=2) as pool:
            warm = list(pool.map(sup.run, specs[:40]))
            before = dict(fds=me.num_fds(), threads=threading.active_count(), rss=me.memory_info().rss,
                          children=len(me.children(recursive=True)))
            results = warm + list(pool.map(sup.run, specs[40:]))
        after = dict(fds=me.num_fds(), threads=threading.active_count(), rss=me.memory_info().rss,
                     tmp=_temp_dirs(expected), children=len(me.children(recursive=True)))
        server = psutil.Process(sup.launcher.server_pid)
        assert server.children(recursive=True) == []
    wrong = [(r.kernel, r.verdict.value, r.reason) for r in results if r.verdict is not expected[r.job_id]]
    assert not wrong, f"{len(wrong)} unexpected verdicts, e.g. {wrong[:3]}"
    jobs = collections.Counter(json.loads(line)["job_id"] for line in audit.read_text().splitlines()
                               if json.loads(line)["type"] == "job")
    assert set(jobs) == set(expected) and set(jobs.values()) == {1}
    assert after["fds"] <= before["fds"] and after["threads"] <= before["threads"]
    assert after["children"] <= before["children"]
    assert after["tmp"] == set()
    assert after["rss"] - before["rss"] < 40 << 20, f"RSS grew {(after['rss'] - before['rss']) / 2**20:.0f} MiB"
