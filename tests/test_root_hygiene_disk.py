"""Disk is a limit: what a job can hold on disk (its work dir, its cache writes, its outputs) is
bounded by `disk`, attacked for real.

Each job writes far more than its limit (24 files of 8 MiB under `disk = "64MiB"`: 192 MiB), then
sleeps, ignoring SIGTERM. With a filesystem image of its own (a root supervisor with loop devices) its writes fail
with ENOSPC at the limit; under the polling fallback the monitor ends it. Either way the verdict is
`disk` with the bytes observed, long before its wall time, and nothing of the job stays mounted or
attached afterwards, whatever ended it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from sandbox import JobSpec, Limits, Supervisor, Verdict
from sandbox.core.limits import ConfigError, MiB, Policy, Tenant
from sandbox.job import disk
from sandbox.watch.monitor import JobControl

from .conftest import ROOT, assert_no_survivors, make_policy

NO_IMAGES = disk.probe()
needs_images = pytest.mark.skipif(NO_IMAGES is not None, reason=f"no filesystem images here: {NO_IMAGES}")

FILLER = """
import errno, json, os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the monitor's SIGTERM at the limit does not stop it
count, size, pause = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
chunk, written, error = b"\\xa5" * (1 << 20), 0, None
try:
    for i in range(count):
        fd = os.open(f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for _ in range(size >> 20):
                written += os.write(fd, chunk)
        finally:
            os.close(fd)
except OSError as err:
    error = errno.errorcode[err.errno]
print(json.dumps({"written": written, "error": error}), flush=True)
time.sleep(pause)
"""
LIMIT = 64 * MiB


def _filler(sup: Supervisor, tmp_path: Path, pause: float = 30.0, control: JobControl | None = None, **limits):
    """24 files of 8 MiB, then a pause, under `disk = "64MiB"` unless `limits` say otherwise."""
    script = tmp_path / "filler.py"
    script.write_text(FILLER)
    limits = {"disk": "64MiB", "wall_time": "40s", **limits}
    return sup.run(JobSpec(kernel=str(script), argv=["24", str(8 * MiB), str(pause)], limits=Limits(**limits)),
                   control=control)


def _report(result) -> dict:
    return json.loads(result.stdout_tail.strip().splitlines()[0])


def _breach(result):
    return next(v for v in result.violations if v.action != "warn")


def _marked(job_id: str) -> list[int]:
    """Processes carrying the job's marker in their environment (exec'd ones)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"TAICHI_SANDBOX_JOB={job_id}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(int(pid))
        except OSError:
            continue
    return found


def leftovers(state: Path, job_id: str, within: float = 5.0) -> list[str]:
    """Mounts of the job's work dir and loop devices backed by images in `state`, once they stay
    for `within` seconds (a mount another mount namespace still held, the job's own, goes when
    the kernel tears that namespace down: its loop device clears a moment later)."""
    deadline = time.monotonic() + within
    while (found := _leftovers(state, job_id)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def _leftovers(state: Path, job_id: str) -> list[str]:
    found = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()
             if f"tsbx-{job_id}-" in line.split()[4]]
    images = str(state / "disk") + "/"
    for name in os.listdir("/sys/block"):
        try:
            backing = Path(f"/sys/block/{name}/loop/backing_file").read_text()
        except OSError:
            continue
        if backing.startswith(images):
            found.append(f"{name}: {backing.strip()}")
    return found


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("disk-state")


@pytest.fixture(scope="module")
def imaged(state):
    with Supervisor(make_policy(state, disk_images="required"), audit_log=state / "audit.jsonl") as sup:
        yield sup


def test_disk_limit_parses_like_other_sizes_and_a_tenant_cannot_raise_it():
    assert Limits(disk="64MiB").disk == LIMIT and Limits(disk="unlimited").disk is None
    assert Limits(memory="unlimited", wall_time="unlimited").memory is None  # was an AttributeError
    with pytest.raises(ConfigError, match="disk"):
        Limits(disk="lots")
    with pytest.raises(ConfigError, match="likely a typo"):
        Limits(disk=64)
    policy = Policy(defaults=Limits(disk="1GiB"), tenants={"t": Tenant()})
    with pytest.raises(ConfigError, match="disk unlimited > 1 GiB"):
        policy.resolve(tenant="t", overrides=Limits(disk="unlimited"))
    assert Policy.load(ROOT / "limits.toml").defaults.disk == 4 << 30


@needs_images
def test_a_job_cannot_write_past_its_disk_limit(imaged, state, tmp_path):
    t = time.monotonic()
    r = _filler(imaged, tmp_path)
    report = _report(r)
    assert report["error"] == "ENOSPC", report
    assert LIMIT - 4 * MiB <= report["written"] <= LIMIT * 1.01, report
    assert r.verdict is Verdict.disk and r.exit_status == 113, (r.verdict, r.reason)
    v = _breach(r)
    assert v.resource == "disk" and v.limit == LIMIT and v.observed >= LIMIT, v
    assert r.usage.peak_disk >= LIMIT
    assert time.monotonic() - t < 20, "the full job was not ended: it slept into its wall time"
    assert r.enforcement["disk"].level == "hard" and "image" in r.enforcement["disk"].by
    assert_no_survivors(imaged, r.job_id)
    assert leftovers(state, r.job_id) == []


def test_the_polling_fallback_ends_a_job_over_its_disk_limit(state, tmp_path):
    with Supervisor(make_policy(state, disk_images="off"), audit_log=state / "audit-polling.jsonl") as sup:
        r = _filler(sup, tmp_path, poll_interval="20ms")
    assert r.verdict is Verdict.disk, (r.verdict, r.reason)
    v = _breach(r)
    assert v.resource == "disk" and v.detected_by == "monitor" and v.observed >= LIMIT and v.action == "sigkill", v
    assert r.enforcement["disk"].level == "watched"
    assert r.usage.wall_seconds < 20


def test_the_polled_walk_does_not_stop_counting_before_the_limit(state, tmp_path, monkeypatch):
    """The polled walk stopped at a fixed 100 000 entries (1.6 GiB of inode charge): behind that
    many empty files a job under a larger limit held any amount of data unmeasured. Scaled down
    here: a cap of one entry, which the walk no longer has (it stops only past the limit's worth)."""
    monkeypatch.setattr(disk, "MAX_ENTRIES", 1, raising=False)
    with Supervisor(make_policy(state, disk_images="off"), audit_log=state / "audit-polling.jsonl") as sup:
        r = _filler(sup, tmp_path, pause=3.0, poll_interval="20ms")
    assert r.verdict is Verdict.disk, (r.verdict, r.reason, r.usage.peak_disk)


DEEP_FILLER = """
import os, time
for _ in range(300):
    os.mkdir('d')
    os.chdir('d')
block = b'x' * (1 << 20)
with open('hidden.bin', 'wb') as f:
    for _ in range(128):
        f.write(block)
time.sleep(3)
"""


def test_data_hidden_deeper_than_the_polled_walk_goes_counts_as_full(state, tmp_path):
    """The polled walk descends 256 levels (a descriptor each): 128 MiB written 300 levels down
    under a 64 MiB limit was measured as 4 MB and the job ended ok. Now such a tree counts as full."""
    script = tmp_path / "deep_filler.py"
    script.write_text(DEEP_FILLER)
    with Supervisor(make_policy(state, disk_images="off"), audit_log=state / "audit-polling.jsonl") as sup:
        r = sup.run(JobSpec(kernel=str(script), limits=Limits(disk=LIMIT, wall_time="30s", poll_interval="20ms")))
    assert r.verdict is Verdict.disk, (r.verdict, r.reason, r.usage.peak_disk)
    assert any("levels deep" in note for note in r.notes), r.notes


@needs_images
def test_many_empty_files_count_against_the_disk_limit(imaged, tmp_path):
    """Each file takes an inode: a job out of inodes has filled its disk as surely as with bytes."""
    script = tmp_path / "files.py"
    script.write_text("import os\nfor i in range(100_000):\n    open(f'e{i}', 'w').close()\n")
    r = imaged.run(JobSpec(kernel=str(script), limits=Limits(disk="4MiB", wall_time="30s")))
    assert r.verdict is Verdict.disk, (r.verdict, r.reason, r.stderr_tail[-300:])
    assert r.error_type == "OSError" and "No space left on device" in r.error_message, (r.error_type, r.error_message)


DEEP = "import os\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\nprint(os.getcwd().count('/'))\n"


@needs_images
def test_a_deep_tree_goes_with_the_image_unwalked(imaged, state, tmp_path):
    """A chain 3000 directories deep made shutil.rmtree raise RecursionError in the supervisor (the
    job's verdict lost); with an image of its own the tree goes with the unmount."""
    script = tmp_path / "deep.py"
    script.write_text(DEEP)
    r = imaged.run(JobSpec(kernel=str(script), limits=Limits(disk="64MiB", wall_time="30s")))
    assert r.verdict is Verdict.ok and int(r.stdout_tail) > 3000, (r.verdict, r.reason, r.stderr_tail[-300:])
    assert leftovers(state, r.job_id) == [] and not list(Path(tempfile.gettempdir()).glob(f"tsbx-{r.job_id}-*"))


HARD_LINKS = """
import os
with open("data", "wb") as f:
    f.write(os.urandom(8 << 20))
for i in range(40):
    os.link("data", f"link{i}")
"""


def test_outputs_cannot_exceed_the_disk_limit(any_disk_supervisor, tmp_path):
    """One 8 MiB file and 40 hard links to it hold 8 MiB in the job's dir, but copied out they were
    41 files of 8 MiB: the copy stops at the job's disk limit."""
    script = tmp_path / "links.py"
    script.write_text(HARD_LINKS)
    out = tmp_path / "out"
    r = any_disk_supervisor.run(JobSpec(kernel=str(script), limits=Limits(disk="32MiB"), outputs=["*"],
                                        output_dir=str(out)))
    assert r.verdict is Verdict.ok, (r.verdict, r.reason, r.stderr_tail)
    copied = sum(p.stat().st_size for p in out.iterdir())
    assert 0 < copied <= 32 * MiB, copied
    assert any("not copied" in n and str(32 * MiB) in n for n in r.notes), r.notes


@pytest.fixture(params=["image", "polling"])
def any_disk_supervisor(request, state):
    if request.param == "image" and NO_IMAGES is not None:
        pytest.skip(f"no filesystem images here: {NO_IMAGES}")
    mode = "required" if request.param == "image" else "off"
    with Supervisor(make_policy(state, disk_images=mode), audit_log=state / f"audit-{mode}.jsonl") as sup:
        yield sup


SUICIDE = "import os, signal\nopen('junk', 'wb').write(b'x' * (1 << 20))\nos.kill(os.getpid(), signal.SIGKILL)\n"


@needs_images
def test_nothing_stays_mounted_or_attached_after_a_killed_or_cancelled_job(imaged, state, tmp_path):
    script = tmp_path / "suicide.py"
    script.write_text(SUICIDE)
    killed = imaged.run(JobSpec(kernel=str(script), limits=Limits(disk="16MiB")))
    assert killed.verdict is Verdict.crashed and killed.signal == "SIGKILL", killed.reason
    assert leftovers(state, killed.job_id) == []
    control = JobControl()
    threading.Timer(1.5, control.cancel).start()
    cancelled = _filler(imaged, tmp_path, control=control, disk="1GiB")
    assert cancelled.verdict is Verdict.cancelled, cancelled.reason
    assert leftovers(state, cancelled.job_id) == []


SLEEPER = ("import os, time\nopen('junk', 'wb').write(b'x' * (1 << 20))\nprint(os.getcwd(), flush=True)\n"
           "time.sleep(60)\n")


@needs_images
@pytest.mark.parametrize("launcher", ["forkserver", "exec"])
def test_a_killed_supervisor_leaves_no_mount_or_loop_device_for_good(state, tmp_path, launcher):
    """SIGKILL of the CLI mid-job: the fork-server (its lifeline) unmounts the job's image at once;
    under the exec launcher nothing is left to do it, so the next supervisor's start does."""
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    limits = tmp_path / "limits.toml"
    limits.write_text(f'[sandbox]\nstate_dir = "{state}"\ndisk_images = "required"\n')
    cli = subprocess.Popen([sys.executable, "-m", "sandbox", "run", "--local", str(script), "--disk", "64MiB",
                            "--launcher", launcher, "--limits-file", str(limits)], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    job_id = Path(cli.stdout.readline().decode().strip()).parent.name.split("-")[1]  # its cwd: <workdir>/work
    assert _leftovers(state, job_id), "the job's image was not mounted"
    cli.send_signal(signal.SIGKILL)
    cli.wait()
    if launcher == "exec":  # the job dies with the CLI (PR_SET_PDEATHSIG); its mount stays until a start reaps it
        deadline = time.monotonic() + 5
        while _marked(job_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _leftovers(state, job_id), "nothing was left to reap"
        Supervisor(make_policy(state, disk_images="required"), audit_log=state / "audit.jsonl").close()
    assert leftovers(state, job_id) == []
