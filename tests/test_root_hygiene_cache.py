"""The tenant's offline cache, attacked by its own jobs (issue 19, class 6).

A job's Taichi writes compiled kernels to `offline_cache_file_path`. When that was the tenant's
cache directory itself, writable by the job, everything a job wrote there (junk of any size and
number, subdirectories, symlinks) stayed for good. Now only genuine kernels the supervisor checked
and copied outlive the job, within the tenant's `cache_quota`, and the next job of the tenant
still loads them. Run as root with real tenant uids.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from sandbox import JobSpec, Policy, Supervisor, Verdict
from sandbox.core.limits import Settings, Tenant
from sandbox.job.namespaces import probe

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or probe() is not None,
                                reason="jobs run as their tenant's own uid only under a root supervisor with namespaces")

JOB = r'''
import json, os, struct, sys, time
import taichi as ti
from taichi.lang import impl
ti.init(arch=ti.cpu)
ti.set_logging_level(ti.DEBUG)  # Taichi logs "Create kernel ... from cache" for a kernel it did not compile
salt = float(sys.argv[2])

@ti.kernel
def genuine(n: ti.i32) -> ti.f32:
    s = 0.0
    for i in range(n):
        s += ti.sin(i * salt) * ti.cos(i * 0.25)
    return s

t = time.perf_counter()
genuine(1000)
first_call = time.perf_counter() - t
cache = impl.current_cfg().offline_cache_file_path
report = {"cache": cache, "first_call": first_call}
if sys.argv[1] == "junk":
    ti.reset()  # Taichi writes the genuine kernel's entry now; the junk goes beside it
    os.chdir(cache)
    with open("big.bin", "wb") as f:
        for _ in range(50):
            f.write(os.urandom(1 << 20))
    for n in range(2000):
        with open(f"junk{n:04}", "w") as f:
            f.write("junk")
    os.makedirs("deep/" * 50)
    forged, planted = "T" + "0" * 64, "T" + "1" * 64
    with open(forged + ".tic", "wb") as f:  # a "kernel" that is not one
        f.write(b"TIC\0" + os.urandom(1 << 20))
    os.symlink(sys.argv[3], planted + ".tic")  # a root-only file, for root to copy
    # List both in the metadata, as Taichi would (length, version, size, count, entries).
    data = open("ticache.tcb", "rb").read()
    version, size, count = data[8:14], struct.unpack_from("<Q", data, 14)[0], struct.unpack_from("<Q", data, 22)[0]
    entries = data[30:]
    for key in (forged, planted):
        k = key.encode()
        entries += struct.pack("<Q", len(k)) + k + struct.pack("<Q", len(k)) + k + struct.pack("<Qqq", 1 << 20, 1, 1)
    body = version + struct.pack("<QQ", size + (2 << 20), count + 2) + entries
    open("ticache.tcb", "wb").write(struct.pack("<Q", len(body) + 8) + body)
print(json.dumps(report))
'''


def _supervisor(state: Path, **tenant) -> Supervisor:
    policy = Policy(tenants={"alice": Tenant(**tenant), "bob": Tenant()},
                    settings=Settings(state_dir=str(state)))
    return Supervisor(policy, audit_log=state / "audit.jsonl")


def _run(sup: Supervisor, script: Path, *argv: str, tenant: str = "alice"):
    r = sup.run(JobSpec(kernel=str(script), argv=list(argv), tenant=tenant))
    assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail[-2000:])
    return r, json.loads(r.stdout_tail.strip().splitlines()[-1])


def _tree(top: Path) -> list[tuple[str, os.stat_result]]:
    """Every entry under `top` (not following symlinks), with its lstat."""
    found = []
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(root) / name
            found.append((str(path.relative_to(top)), path.lstat()))
    return found


def test_junk_symlinks_and_forged_kernels_a_job_writes_to_its_offline_cache_do_not_outlive_it(tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root-only-secret\n" * 100)
    secret.chmod(0o600)
    script = tmp_path / "job.py"
    script.write_text(JOB)
    state = tmp_path / "state"
    with _supervisor(state) as sup:
        first, report = _run(sup, script, "junk", "0.5", str(secret))
        kept = state / "ticache" / "alice"
        entries = _tree(kept)
        names = sorted(name for name, _ in entries)
        size = sum(st.st_size for _, st in entries)
        assert size < 1 << 20 and len(entries) < 10, (f"{len(entries)} entries, {size} bytes outlived the job: "
                                                      f"{names[:8]}")
        assert not any(stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode) for _, st in entries), names
        assert not any(b"root-only-secret" in (kept / name).read_bytes() for name in names), "promotion followed a symlink"
        assert "ticache.tcb" in names and sum(n.endswith(".tic") for n in names) == 1, names
        for name, st in entries:  # root's, read-only: no job of the tenant can change a kept kernel
            assert (st.st_uid, st.st_mode & 0o222) == (0, 0), (name, st.st_uid, oct(st.st_mode))
        assert kept.stat().st_uid == 0 and kept.stat().st_mode & 0o007 == 0
        # The genuine kernel outlived the job: the tenant's next job loads it instead of compiling it.
        warm, warm_report = _run(sup, script, "plain", "0.5")
        cold, cold_report = _run(sup, script, "plain", "0.75")  # another kernel: compiled
    assert "from cache" in warm.stdout_tail + warm.stderr_tail, warm.stderr_tail[-2000:]
    assert "from cache" not in cold.stdout_tail + cold.stderr_tail
    assert warm_report["first_call"] < cold_report["first_call"], (warm_report, cold_report)
    assert report["cache"] != str(kept), "the job wrote the tenant's cache directory itself"


def test_a_job_cannot_change_the_kernels_its_tenant_keeps(tmp_path):
    """The job reads the tenant's kernels; it cannot write them, rename them or add beside them."""
    script = tmp_path / "job.py"
    script.write_text(JOB)
    tamper = tmp_path / "tamper.py"
    tamper.write_text(
        "import json, os, sys\nkept, results = sys.argv[1], {}\n"
        "for name in sorted(os.listdir(kept)):\n"
        "    path = os.path.join(kept, name)\n"
        "    for what, act in (('write', lambda: open(path, 'r+b').write(b'X')),\n"
        "                      ('chmod', lambda: os.chmod(path, 0o666)),\n"
        "                      ('rename', lambda: os.rename(path, path + '.x')),\n"
        "                      ('plant', lambda: open(os.path.join(kept, 'planted.tic'), 'w'))):\n"
        "        try:\n"
        "            act()\n"
        "            results[f'{name} {what}'] = 'done'\n"
        "        except OSError as err:\n"
        "            results[f'{name} {what}'] = type(err).__name__\n"
        "print(json.dumps(results))\n")
    state = tmp_path / "state"
    with _supervisor(state) as sup:
        _run(sup, script, "plain", "0.5")
        kept = state / "ticache" / "alice"
        before = {p.name: p.read_bytes() for p in kept.iterdir()}
        _, results = _run(sup, tamper, str(kept))
        after = {p.name: p.read_bytes() for p in kept.iterdir()}
    assert results and "done" not in results.values(), results
    assert after == before


@pytest.mark.slow
def test_the_tenants_kept_kernels_stay_within_its_cache_quota_least_recently_used_out(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    state = tmp_path / "state"
    with _supervisor(state, cache_quota="50KiB") as sup:  # two of these kernels (~23 KiB each), not three
        _run(sup, script, "plain", "0.1")
        time.sleep(1.1)  # Taichi's times are whole seconds
        _run(sup, script, "plain", "0.2")
        time.sleep(1.1)
        reused, _ = _run(sup, script, "plain", "0.1")  # the first kernel used again: now the second is the oldest
        assert "from cache" in reused.stdout_tail + reused.stderr_tail
        time.sleep(1.1)
        third, _ = _run(sup, script, "plain", "0.3")
        kept = state / "ticache" / "alice"
        size = sum(p.stat().st_size for p in kept.iterdir() if p.name.endswith(".tic"))
        assert size <= 50 * 1024, size
        again = {salt: _run(sup, script, "plain", salt)[0] for salt in ("0.1", "0.3", "0.2")}
    hits = {salt: "from cache" in r.stdout_tail + r.stderr_tail for salt, r in again.items()}
    assert hits == {"0.1": True, "0.3": True, "0.2": False}, (hits, third.notes)


def test_a_tenants_kept_kernels_are_not_readable_by_another_tenants_jobs(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB)
    peek = tmp_path / "peek.py"
    peek.write_text("import os, sys\ntry:\n    print(os.listdir(sys.argv[1]))\nexcept OSError as err:\n"
                    "    print(type(err).__name__)\n")
    state = tmp_path / "state"
    with _supervisor(state) as sup:
        _run(sup, script, "plain", "0.5")
        r = sup.run(JobSpec(kernel=str(peek), argv=[str(state / "ticache" / "alice")], tenant="bob"))
    assert r.stdout_tail.strip() in ("PermissionError", "FileNotFoundError"), r.stdout_tail


OVERFLOWING = r'''
import struct
body = struct.pack("<3HQQ", 1, 7, 3, 0, 1) + struct.pack("<Q", (1 << 64) - 1) + b"T" * 70  # one key of 2**64-1 bytes
open("../cache/ticache.tcb", "wb").write(struct.pack("<Q", len(body) + 8) + body)
'''


def test_a_key_length_past_any_offset_in_the_jobs_metadata_does_not_lose_the_verdict(tmp_path):
    """The offset past a key of 2**64-1 bytes overflowed struct's offset (OverflowError, no
    ValueError): promotion raised out of the supervisor and the job had no verdict."""
    script = tmp_path / "job.py"
    script.write_text(OVERFLOWING)
    with _supervisor(tmp_path / "state") as sup:
        r = sup.run(JobSpec(kernel=str(script), tenant="alice"))
    assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail[-2000:])
    assert any("offline cache" in note and "not kept" in note for note in r.notes), r.notes
