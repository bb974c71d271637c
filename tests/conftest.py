"""Fixtures: real supervisors (fork-server and exec launchers) with private state and audit log."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from sandbox import JobSpec, Limits, Policy, Supervisor
from sandbox.job.cgroup import CgroupHost
from sandbox.job.cgroup.host import host_v2, parse_mountinfo, parse_proc_cgroup, select_hierarchy
from sandbox.core.limits import Settings

# Read by Ray when it is imported: on Linux, without it Ray binds the machine's non-loopback address.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# CLI runs in-process, leaving no warm server (sandbox.warm) behind; tests/test_warm.py turns it on.
os.environ.setdefault("TAICHI_SANDBOX_WARM", "0")

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels"
TESTS_TMP: list[Path] = []  # where the tests' temporary directories are (see pytest_configure)


def pytest_configure(config) -> None:
    """Jobs in their own namespaces get a private /tmp and /var/tmp, so the test's temporary
    directories (where tests put the scripts and files they hand jobs) live elsewhere: one per
    checkout, under /var/lib as root, else under the user's cache."""
    if config.option.basetemp is None:
        base = Path("/var/lib") if os.geteuid() == 0 else Path.home() / ".cache"
        tag = hashlib.sha256(str(ROOT).encode()).hexdigest()[:12]
        TESTS_TMP.append(base / "taichi-sandbox-tests")
        TESTS_TMP[0].mkdir(mode=0o755, parents=True, exist_ok=True)
        config.option.basetemp = str(TESTS_TMP[0] / tag)


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


def make_policy(state_dir: Path, **settings) -> Policy:
    return Policy(settings=Settings(state_dir=str(state_dir), **settings))


SUPERVISORS = ["forkserver", "exec", "polling"]  # the variants of any_supervisor


def slow_beyond_first(fixture: str, variants: list[str]):
    """Parametrize `fixture` (indirectly) over `variants`, the first as usual and the others marked
    `slow` (run by `make test-slow`): for a long check that one variant in `make test` covers."""
    return pytest.mark.parametrize(fixture, [variants[0], *(pytest.param(v, marks=pytest.mark.slow)
                                                            for v in variants[1:])], indirect=True)


@pytest.fixture(scope="session", params=SUPERVISORS)
def any_supervisor(request, state_dir):
    """Both launchers with job cgroups and namespaces where this machine has them, and the
    fork-server with both off (the fallback: polling, no isolation): tests using this run once per
    variant."""
    fallback = {"cgroups": "off", "isolation": "off", "allow_root": True} if request.param == "polling" else {}
    with Supervisor(make_policy(state_dir, **fallback), launcher="exec" if request.param == "exec" else None,
                    audit_log=state_dir / f"audit-{request.param}.jsonl") as sup:
        yield sup


def second_v2_hierarchy() -> tuple[CgroupHost | None, str]:
    """On a hybrid host, the cgroup v2 mount beside the v1 controllers (no memory, pids or cpu
    controller there, but cpu.stat, cgroup.kill and membership are real v2): a host using it, or
    None and why not. On a pure v2 host the default supervisors already run v2."""
    mounts = parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    if select_hierarchy(mounts)[0] == 2:
        return None, "this host is pure cgroup v2: the default supervisors run the v2 path"
    unified = [m for m in mounts if m.fstype == "cgroup2"]
    if not unified:
        return None, "no cgroup v2 mount on this host"
    host = host_v2(unified[0], parse_proc_cgroup(Path("/proc/self/cgroup").read_text()).get("", "/"))
    return (host, "") if host.version == 2 else (None, host.reason)


def kernel_enforces(sup: Supervisor, limit: str) -> bool:
    """Whether the kernel (a job cgroup) enforces `limit` for this supervisor's jobs."""
    return limit in sup.cgroups.enforces()


@pytest.fixture(scope="session")
def supervisor(state_dir):
    """The default (fork-server) supervisor."""
    with Supervisor(make_policy(state_dir), audit_log=state_dir / "audit.jsonl") as sup:
        yield sup


@pytest.fixture(autouse=True)
def _jobs_may_use_tmp_path(request):
    """Jobs of a root supervisor run as their tenant's uid: let them pass through the test's
    temporary directories, read the scripts written there and write the files a test hands them."""
    if os.geteuid() == 0 and "tmp_path" in request.fixturenames:
        tmp = request.getfixturevalue("tmp_path")
        tmp.chmod(0o777)
        for parent in tmp.parents:
            if str(parent) in ("/", tempfile.gettempdir()) or parent in TESTS_TMP:
                break
            parent.chmod(parent.stat().st_mode | 0o111)


@pytest.fixture(scope="session")
def ray_home(tmp_path_factory):
    """The HOME of every Ray session a test starts in this process: Ray keeps the authentication token
    it made at the first `ray.init` under ~/.ray and looks for it there at every later one."""
    return tmp_path_factory.mktemp("rayhome")


def kernel(name: str) -> str:
    return str(KERNELS / name)


def alive(proc: psutil.Process | int) -> bool:
    """Whether a process (or pid) runs: not gone, not a zombie (it may end between any two reads)."""
    try:
        return (proc if isinstance(proc, psutil.Process) else psutil.Process(proc)).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _in_other_pid_namespaces() -> list[psutil.Process]:
    """Processes in a PID namespace other than ours started through this checkout's interpreter:
    between sequential jobs, only what a job that ran in its own namespaces left behind (not the
    jobs of a test run in another checkout, which uses another venv)."""
    own = os.stat("/proc/self/ns/pid").st_ino
    found = []
    for name in os.listdir("/proc"):
        try:
            if name.isdigit() and os.stat(f"/proc/{name}/ns/pid").st_ino != own and _ours(psutil.Process(int(name)), own):
                found.append(psutil.Process(int(name)))
        except (OSError, psutil.Error):
            continue
    return found


def _ours(proc: psutil.Process, own_ns: int) -> bool:
    """Whether the nearest ancestor of `proc` in our PID namespace (its relay, or the fork-server
    that relays) runs this interpreter; when none is found (re-parented to the host's init), yes."""
    for parent in proc.parents():
        if parent.pid != 1 and os.stat(f"/proc/{parent.pid}/ns/pid").st_ino == own_ns:
            return parent.cmdline()[:1] == [sys.executable]
    return True


def job_processes(sup: Supervisor, job_id: str, pids=()) -> list[psutil.Process]:
    """Live processes of a finished job: exec'd ones carry TAICHI_SANDBOX_JOB in /proc/PID/environ;
    forked ones are descendants of the fork-server (which has none between sequential jobs); and
    any pids the job itself reported (in its own PID namespace those are not host pids: then every
    process in another PID namespace)."""
    found = {}
    if sup.namespaces_unavailable() is None:
        found.update((p.pid, p) for p in _in_other_pid_namespaces() if alive(p))
        pids = ()
    for proc in psutil.process_iter():
        try:
            if alive(proc) and proc.environ().get("TAICHI_SANDBOX_JOB") == job_id:
                found[proc.pid] = proc
        except psutil.Error:
            continue
    server = getattr(sup.launcher, "server_pid", None)
    if server is not None:
        for proc in psutil.Process(server).children(recursive=True):
            if alive(proc):
                found[proc.pid] = proc
    for pid in pids:
        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            continue
        if alive(proc):
            found[pid] = proc
    return list(found.values())


def assert_no_survivors(sup: Supervisor, job_id: str, pids=(), within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while job_processes(sup, job_id, pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert job_processes(sup, job_id, pids) == [], f"job {job_id} left processes alive"


def run(sup: Supervisor, name: str, **limits):
    """Run kernels/NAME under `limits`; assert nothing of it survives; return the result."""
    spec_fields = {k: limits.pop(k) for k in ("args", "kwargs", "argv", "env", "arch") if k in limits}
    result = sup.run(JobSpec(kernel=kernel(name), limits=Limits(**limits), **spec_fields))
    assert_no_survivors(sup, result.job_id)
    return result
