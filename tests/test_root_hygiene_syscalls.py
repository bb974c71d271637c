"""Kernel attack surface a job reaches through system calls, and other jobs' cgroups, attacked for real.

A job that may create a user namespace of its own holds every capability inside it and can then
make network namespaces (kernel memory outside its cgroup's limit: thousands, pinned by bind
mounts, grew the host's slab by 634 MiB for a job limited to 256 MiB), mount filesystems and reach
code paths an unprivileged process never could. Keys it adds to its uid's user keyring outlive it
and reach the tenant's next job. bpf, perf_event_open, userfaultfd and io_uring are large kernel
surfaces no Taichi job needs; an i386 system call (`int 0x80`) from a 64-bit process is numbered
differently and slips past a filter that checks only native numbers. Each job below tries one of
these as its tenant's own uid in its own namespaces (and, where it says so, through the exec
launcher, without namespaces, or under a supervisor that is not root) and reports what the kernel
answered; every test here failed before the system-call filter and the cgroup namespace.
"""

from __future__ import annotations

import json
import os
import secrets
import threading

import pytest

from sandbox import JobSpec, Limits, Policy, Supervisor, Verdict
from sandbox.core.limits import Settings, Tenant
from sandbox.job import syscalls
from sandbox.job.cgroup.view import joined_hierarchies
from sandbox.job.namespaces import probe
from sandbox.watch.gpu import probe as probe_arch

from .conftest import kernel

NO_NAMESPACES = probe()
root_with_namespaces = pytest.mark.skipif(
    os.geteuid() != 0 or NO_NAMESPACES is not None,
    reason=f"jobs run as a tenant's uid in their own namespaces only under a root supervisor ({NO_NAMESPACES})")

# How each job names what the kernel answered: "ok", or the errno's name.
PRELUDE = """
import ctypes, errno, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def failed():
    return errno.errorcode.get(ctypes.get_errno(), str(ctypes.get_errno()))
def answer(result):
    return "ok" if result >= 0 else failed()
"""

NAMESPACES = PRELUDE + """
import subprocess, threading
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, SIGCHLD = 0x20000, 0x10000000, 0x40000000, 17
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 1 << 18
found = {}
uid, gid = os.getuid(), os.getgid()
if libc.unshare(CLONE_NEWUSER | CLONE_NEWNS) == 0:
    found["unshare user"] = "ok"
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    libc.mount(None, b"/", None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None)
    if libc.mount(b"tmpfs", b"/tmp", b"tmpfs", ctypes.c_ulong(0), None) != 0:
        found["mount in it"] = failed()
    pinned = 0
    for i in range(50):  # each one pinned by a bind mount: they outlive the unshare
        if libc.unshare(CLONE_NEWNET) != 0:
            found["unshare net"] = failed()
            break
        open(f"/tmp/net{i}", "w").close()
        if libc.mount(b"/proc/self/ns/net", f"/tmp/net{i}".encode(), None, ctypes.c_ulong(MS_BIND), None) != 0:
            found["pin"] = failed()
            break
        pinned += 1
    found["network namespaces"] = pinned
else:
    found["unshare user"] = failed()
pid = libc.syscall(56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)  # clone
if pid == 0:
    os._exit(0)
found["clone user"] = answer(pid)
if pid > 0:
    os.waitpid(pid, 0)
args = (ctypes.c_uint64 * 11)(CLONE_NEWUSER, 0, 0, 0, SIGCHLD)  # struct clone_args: flags, ..., exit_signal
pid = libc.syscall(435, args, ctypes.sizeof(args))  # clone3
if pid == 0:
    os._exit(0)
found["clone3 user"] = answer(pid)
if pid > 0:
    os.waitpid(pid, 0)
fd = os.open("/proc/self/ns/net", os.O_RDONLY)
found["setns"] = answer(libc.setns(fd, 0))
# What every job needs still works: threads (glibc tries clone3 first), fork, a subprocess.
box = []
thread = threading.Thread(target=box.append, args=("ran",))
thread.start()
thread.join()
found["thread"] = box[0] if box else "did not run"
child = os.fork()
if child == 0:
    os._exit(7)
found["fork"] = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
found["subprocess"] = subprocess.run(["/bin/echo", "hi"], capture_output=True, text=True).stdout.strip()
print(json.dumps(found))
"""

KEY_ADD = PRELUDE + """
payload = b"left by an earlier job"
print(json.dumps({"add_key": answer(libc.syscall(248, b"user", sys.argv[1].encode(), payload, len(payload), -4))}))
"""

KEY_FIND = PRELUDE + """
KEYCTL_SEARCH, KEYCTL_READ, KEYCTL_INVALIDATE, USER_KEYRING = 10, 11, 21, -4
key = libc.syscall(250, KEYCTL_SEARCH, USER_KEYRING, b"user", sys.argv[1].encode(), 0)
if key < 0:
    print(json.dumps({"found": failed()}))
else:
    buf = ctypes.create_string_buffer(256)
    size = libc.syscall(250, KEYCTL_READ, key, buf, 256)
    libc.syscall(250, KEYCTL_INVALIDATE, key)  # the test's own cleanup: it would outlive the test too
    print(json.dumps({"found": buf.raw[:size].decode() if size >= 0 else failed()}))
"""

SURFACE = PRELUDE + """
import signal, time
found = {}
attr = (ctypes.c_uint64 * 16)()  # struct perf_event_attr, 128 bytes
attr[0] = 1 | (128 << 32)  # PERF_TYPE_SOFTWARE, size
attr[1] = 1  # PERF_COUNT_SW_TASK_CLOCK
attr[5] = (1 << 5) | (1 << 6)  # exclude_kernel, exclude_hv: allowed at perf_event_paranoid 2
found["perf_event_open"] = answer(libc.syscall(298, attr, 0, -1, -1, 0))
found["userfaultfd"] = answer(libc.syscall(323, 1 | os.O_CLOEXEC))  # UFFD_USER_MODE_ONLY
params = (ctypes.c_uint8 * 120)()
found["io_uring_setup"] = answer(libc.syscall(425, 1, params))
bpf_attr = (ctypes.c_uint32 * 30)(2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY, key 4, value 4, one entry
found["bpf"] = answer(libc.syscall(321, 0, bpf_attr, ctypes.sizeof(bpf_attr)))
found["mount"] = answer(libc.mount(b"tmpfs", b"/nonexistent-tsbx-target", b"tmpfs", ctypes.c_ulong(0), None))
found["keyctl"] = answer(libc.syscall(250, 0, -4, 0))  # KEYCTL_GET_KEYRING_ID of the user keyring
child = os.fork()
if child == 0:
    time.sleep(30)
    os._exit(0)
found["ptrace"] = answer(libc.syscall(101, 16, child, 0, 0))  # PTRACE_ATTACH to its own child
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
found["personality READ_IMPLIES_EXEC"] = answer(libc.personality(0x0400000))
allowed = {"personality PER_LINUX": answer(libc.personality(0))}
print(json.dumps({"denied": found, "allowed": allowed}))
"""

# 32-bit system calls from a 64-bit process (`int 0x80`, the i386 ABI): getpid and unshare, which
# the i386 table numbers 20 and 310 (the native one 39 and 272).
I386 = PRELUDE + """
import mmap
def i386(number, ebx=0):
    code = bytes([0x53, 0xb8]) + number.to_bytes(4, "little") + bytes([0xbb]) + ebx.to_bytes(4, "little") + \\
        bytes([0xcd, 0x80, 0x5b, 0xc3])  # push rbx; mov eax, N; mov ebx, A; int 0x80; pop rbx; ret
    page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    result = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
    return "ok" if result >= 0 else errno.errorcode.get(-result, str(-result))
print(json.dumps({"getpid": i386(20), "unshare user": i386(310, 0x10000000)}))
"""

CGROUPS = """
import json, os, sys
dirs = []
for top, subdirs, _ in os.walk("/sys/fs/cgroup"):
    depth = top.count("/") - 3
    dirs.extend(os.path.join(top, d) for d in subdirs)
    if depth >= 6 or len(dirs) > 20000:
        subdirs[:] = []
limits = {}
for path in ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory.max"):
    try:
        limits[path] = open(path).read().strip()
    except OSError as err:
        limits[path] = type(err).__name__
print(json.dumps({"dirs": dirs, "proc_cgroup": open("/proc/self/cgroup").read().splitlines(), "limits": limits}))
"""

WAIT_FOR = """
import os, sys, time
print("ready", flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.05)
"""


def _policy(tmp_path, **settings) -> Policy:
    return Policy(tenants={"alice": Tenant(), "bob": Tenant()},
                  settings=Settings(state_dir=str(tmp_path / "state"), **settings))


def _supervisor(tmp_path, path: str, **settings) -> Supervisor:
    """`path`: "forkserver", "exec" or "no-namespaces" (the fork-server, jobs as root in the
    supervisor's namespaces: the only way a root supervisor runs a job without them)."""
    if path == "no-namespaces":
        settings.update(isolation="off", allow_root=True)
    return Supervisor(_policy(tmp_path, **settings), launcher="exec" if path == "exec" else None,
                      audit_log=tmp_path / "audit.jsonl")


def _script(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(0o644)
    return str(path)


def _report(sup: Supervisor, script: str, *argv: str, tenant: str = "alice", **limits) -> dict:
    r = sup.run(JobSpec(kernel=script, argv=list(argv), tenant=tenant, limits=Limits(**limits)))
    assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail[-3000:])
    return json.loads(r.stdout_tail.strip().splitlines()[-1])


PATHS = ["forkserver", "exec", "no-namespaces"]


@root_with_namespaces
@pytest.mark.parametrize("path", PATHS)
def test_a_job_cannot_create_a_user_namespace_and_pin_network_namespaces(tmp_path, path):
    with _supervisor(tmp_path, path) as sup:
        found = _report(sup, _script(tmp_path, "ns.py", NAMESPACES))
    assert found == {"unshare user": "EPERM", "clone user": "EPERM", "clone3 user": "ENOSYS", "setns": "EPERM",
                     "thread": "ran", "fork": 7, "subprocess": "hi"}


@root_with_namespaces
@pytest.mark.parametrize("isolation", ["auto", "off"])
def test_under_a_supervisor_that_is_not_root_a_job_cannot_create_namespaces(tmp_path, isolation):
    import subprocess
    import sys
    from .test_isolation import AS_UID, NOT_ROOT_SUPERVISOR, OPERATOR_UID
    home = tmp_path / "operator"
    home.mkdir()
    os.chown(home, OPERATOR_UID, OPERATOR_UID)
    script = _script(home, "ns.py", NAMESPACES)
    done = subprocess.run([sys.executable, "-c", AS_UID, str(OPERATOR_UID), NOT_ROOT_SUPERVISOR, str(home / "state"),
                           isolation, script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["verdict"] == "ok", report
    found = json.loads(report["stdout"].strip().splitlines()[-1])
    assert (found["unshare user"], found["clone user"], found["clone3 user"]) == ("EPERM", "EPERM", "ENOSYS")
    assert (found["thread"], found["fork"], found["subprocess"]) == ("ran", 7, "hi")


@root_with_namespaces
def test_a_key_one_job_adds_to_its_user_keyring_does_not_reach_the_tenants_next_job(tmp_path):
    name = f"tsbx-test-{secrets.token_hex(4)}"
    with _supervisor(tmp_path, "forkserver") as sup:
        added = _report(sup, _script(tmp_path, "add.py", KEY_ADD), name)
        found = _report(sup, _script(tmp_path, "find.py", KEY_FIND), name)
    assert added == {"add_key": "EPERM"} and found == {"found": "EPERM"}


@root_with_namespaces
@pytest.mark.parametrize("path", PATHS)
def test_kernel_attack_surface_calls_are_refused_with_eperm(tmp_path, path):
    with _supervisor(tmp_path, path) as sup:
        found = _report(sup, _script(tmp_path, "surface.py", SURFACE))
    assert found["denied"] == dict.fromkeys(found["denied"], "EPERM") and len(found["denied"]) == 8
    assert found["allowed"] == {"personality PER_LINUX": "ok"}


@root_with_namespaces
def test_an_i386_system_call_through_int_0x80_is_refused(tmp_path):
    with _supervisor(tmp_path, "forkserver") as sup:
        found = _report(sup, _script(tmp_path, "i386.py", I386))
    assert found == {"getpid": "EPERM", "unshare user": "EPERM"}


@root_with_namespaces
def test_a_job_sees_no_other_jobs_cgroup_and_only_its_own_as_the_root(tmp_path):
    release = tmp_path / "release"
    ready = threading.Event()
    tag = secrets.token_hex(4)
    other = f"bob-{tag}"
    with _supervisor(tmp_path, "forkserver") as sup:
        if sup.cgroups.version is None:
            pytest.skip(f"no job cgroups here: {sup.cgroups.reason}")
        waiting = {}
        thread = threading.Thread(target=lambda: waiting.update(r=sup.run(
            JobSpec(job_id=other, kernel=_script(tmp_path, "wait.py", WAIT_FOR), argv=[str(release)], tenant="bob"),
            on_output=lambda stream, data: ready.set())))
        thread.start()
        try:
            assert ready.wait(60), "the other tenant's job did not start"
            found = _report(sup, _script(tmp_path, "cgroups.py", CGROUPS), tenant="alice", memory="512MiB")
        finally:
            release.write_text("")
            thread.join(90)
    assert waiting["r"].verdict is Verdict.ok, waiting["r"].reason
    assert not [d for d in found["dirs"] if other in d]  # bob's job is not there
    assert not [d for d in found["dirs"] if "/job-" in d]  # nor its own under a job name: it is the root
    assert all(line.endswith(":/") for line in found["proc_cgroup"]), found["proc_cgroup"]
    own = found["limits"]["/sys/fs/cgroup/memory/memory.limit_in_bytes" if sup.cgroups.version == 1
                          else "/sys/fs/cgroup/memory.max"]
    assert own == str(512 << 20)  # its own limit, read where a container reads it


@root_with_namespaces
def test_with_the_filter_off_the_same_job_creates_namespaces_and_enforcement_says_so(tmp_path):
    script = _script(tmp_path, "ns.py", NAMESPACES)
    with _supervisor(tmp_path, "forkserver", syscall_filter="off") as sup:
        r = sup.run(JobSpec(kernel=script, tenant="alice"))
    found = json.loads(r.stdout_tail.strip().splitlines()[-1])
    assert (found["unshare user"], found["network namespaces"]) == ("ok", 50)  # the attack is real
    assert r.enforcement["syscalls"].level == "off" and 'syscall_filter = "off"' in r.enforcement["syscalls"].note
    with _supervisor(tmp_path, "forkserver") as sup:
        on = sup.run(JobSpec(kernel=kernel("tiny.py"), tenant="alice"))
    assert on.verdict is Verdict.ok and on.enforcement["syscalls"].level == "hard"
    assert "CLONE_NEW*" in on.enforcement["syscalls"].by and "i386" in on.enforcement["syscalls"].by


def test_where_the_filter_cannot_be_installed_jobs_are_rejected_not_run_unfiltered(tmp_path, monkeypatch):
    monkeypatch.setattr(syscalls, "unavailable", lambda: "pyseccomp cannot load libseccomp (not found)")
    with Supervisor(_policy(tmp_path, allow_root=True), audit_log=tmp_path / "audit.jsonl") as sup:
        r = sup.run(JobSpec(kernel=kernel("tiny.py")))
    assert r.verdict is Verdict.rejected
    assert r.reason == ('the system-call filter is on ([sandbox] syscall_filter = "default") but pyseccomp cannot '
                        'load libseccomp (not found); set syscall_filter = "off" to run jobs without it')


def test_on_an_architecture_it_was_not_written_for_the_filter_says_so(monkeypatch):
    monkeypatch.setattr(syscalls.platform, "machine", lambda: "s390x")
    monkeypatch.setattr(syscalls, "_prepared", False)
    syscalls._built.cache_clear()
    syscalls.unavailable.cache_clear()
    try:
        with pytest.raises(syscalls.SyscallFilterUnavailable, match="not prepared before the job's environment"):
            syscalls.install()
        syscalls.prepare()
        assert syscalls.unavailable() == "the system-call filter is written for x86_64 and aarch64, not s390x"
        with pytest.raises(syscalls.SyscallFilterUnavailable, match="cannot be installed: .* not s390x"):
            syscalls.install()
    finally:
        syscalls._built.cache_clear()
        syscalls.unavailable.cache_clear()


HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd,release_agent=/x
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
"""
UNIFIED = "31 23 0:28 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n"


def test_only_the_hierarchies_a_job_joined_are_mounted_afresh_with_their_own_options():
    joined = ["/sys/fs/cgroup/memory/taichi-sandbox/job-a/tasks", "/sys/fs/cgroup/cpu,cpuacct/taichi-sandbox/job-a/tasks"]
    assert sorted(joined_hierarchies(HYBRID, joined)) == [("cpu,cpuacct", "cgroup", "cpu,cpuacct"),
                                                          ("memory", "cgroup", "memory")]
    assert joined_hierarchies(HYBRID, ["/sys/fs/cgroup/unified/s/job-a/cgroup.procs"]) == [("unified", "cgroup2", None)]
    assert joined_hierarchies(UNIFIED, ["/sys/fs/cgroup/s/job-a/cgroup.procs"]) == [("", "cgroup2", None)]
    assert joined_hierarchies(HYBRID, []) == []  # no job cgroup: an empty /sys/fs/cgroup


BUNDLED = [("tiny.py", None), ("saxpy.py", None), ("reduction.py", "sum_of_squares"), ("heat_stencil.py", "simulate")]


@pytest.mark.parametrize("arch", ["cpu", "vulkan"])
def test_bundled_kernels_and_callables_run_under_the_filter(tmp_path, arch):
    usable = probe_arch(arch)
    if not usable.usable:
        pytest.skip(f"arch {arch} unusable here: {usable.reason}")
    with Supervisor(_policy(tmp_path), audit_log=tmp_path / "audit.jsonl") as sup:
        for name, function in BUNDLED:
            target = kernel(name) + (f":{function}" if function else "")
            kwargs = {"n": 64, "steps": 10} if function == "simulate" else {}
            r = sup.run(JobSpec(kernel=target, arch=arch, tenant="alice" if os.geteuid() == 0 else None,
                                kwargs=kwargs))
            assert r.verdict is Verdict.ok, (name, r.reason, r.stderr_tail[-2000:])
            assert r.enforcement["syscalls"].level == "hard"
        shipped = sup.run(JobSpec(kernel=square_sum, args=[10], arch=arch))
    assert shipped.verdict is Verdict.ok and shipped.return_value == 285, (shipped.reason, shipped.stderr_tail[-2000:])


def square_sum(n: int) -> int:
    """A callable shipped to the job (a Taichi kernel inside)."""
    import taichi as ti
    x = ti.field(ti.i64, shape=n)

    @ti.kernel
    def fill():
        for i in x:
            x[i] = i * i

    fill()
    return int(x.to_numpy().sum())
