"""The systemd units in deploy/: they parse (`systemd-analyze verify`, where installed; the keys
are checked in any case), keep their hardening and reload keys, score what docs/operators.md says
(`systemd-analyze security --offline`), and the service does its whole job inside the sandbox the
unit gives it, laid here as systemd would (no systemd runs here): its capability bounding set and
no_new_privs (setpriv), its read-only file system and private /tmp (a mount namespace), its seccomp
filter (pyseccomp) and device policy (a devices cgroup); a real service, real jobs as tenant uids
in namespaces and cgroups, one on a disk image (a loop device), one killed at its wall time, one
with an output file."""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from .test_service import Node

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
UNIT = DEPLOY / "taichi-sandbox.service"
SOCKET = DEPLOY / "taichi-sandbox.socket"
SYSUSERS = DEPLOY / "sysusers.d" / "taichi-sandbox.conf"
ANALYZE = shutil.which("systemd-analyze")
SCORE = 4.5  # docs/operators.md, "Hardening of the unit"
KEPT = {"ExecReload": "/bin/kill -HUP $MAINPID", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "PrivateTmp": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes", "DevicePolicy": "closed",
        "RestrictNamespaces": "~user", "RestrictSUIDSGID": "yes", "LockPersonality": "yes",
        "SystemCallArchitectures": "native", "Delegate": "yes", "KillMode": "mixed", "Type": "notify"}
CAPABILITY_NUMBERS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_KILL": 5, "CAP_SETGID": 6, "CAP_SETUID": 7,
                      "CAP_SETPCAP": 8, "CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24}
CAPABILITIES = set(CAPABILITY_NUMBERS)  # the unit's bounding set (linux/capability.h numbers)


def service_keys() -> dict[str, list[str]]:
    """[Service] of the unit: each key's values in order (systemd keys may repeat)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                       dict_type=_MultiDict, empty_lines_in_values=False)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return {key: value.split("\n") for key, value in parser["Service"].items()}


class _MultiDict(dict):
    """Repeated keys join their values with newlines (as configparser does for continuation lines)."""

    def __setitem__(self, key, value):
        if key in self and isinstance(value, list) and isinstance(self[key], list):
            self[key].extend(value)
        else:
            super().__setitem__(key, value)


def bounding_set() -> set[str]:
    return set(service_keys()["CapabilityBoundingSet"][0].split())


def test_the_unit_keeps_its_hardening_reload_and_exactly_the_capabilities_documented():
    keys = service_keys()
    assert {key: keys.get(key, [None])[-1] for key in KEPT} == KEPT
    assert bounding_set() == CAPABILITIES
    assert "ProtectHostname" not in keys and "MemoryDenyWriteExecute" not in keys  # jobs: sethostname, JIT
    assert set(keys["DeviceAllow"]) == {"/dev/loop-control rw", "block-loop rw", "char-nvidia* rw", "char-drm rw"}
    socket_unit = SOCKET.read_text()
    assert "SocketGroup=taichi-sandbox" in socket_unit
    assert re.search(r"^g taichi-sandbox -", SYSUSERS.read_text(), re.M), "sysusers.d must create the socket group"


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_the_units_without_a_warning(tmp_path):
    # The command lines name the installed entry point; here it is absent, so point them at /bin/true.
    for unit in (UNIT, SOCKET):
        (tmp_path / unit.name).write_text(unit.read_text().replace("/usr/local/bin/taichi-sandbox", "/bin/true"))
    done = subprocess.run([ANALYZE, "verify", *(str(tmp_path / u.name) for u in (UNIT, SOCKET))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")
def test_the_exposure_score_is_the_documented_one():
    done = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)], capture_output=True,
                          text=True, timeout=120)
    if "--offline" in done.stderr and "unrecognized" in done.stderr:
        pytest.skip("systemd-analyze before 250: no offline security analysis")
    score = re.search(r"Overall exposure level for taichi-sandbox.service: ([0-9.]+)", done.stdout)
    assert score, done.stdout + done.stderr
    assert float(score.group(1)) == SCORE
    assert f"{SCORE} OK" in (UNIT.parent.parent / "docs" / "operators.md").read_text()


# The unit's sandbox as systemd would lay it, for argv[5:] (run under `unshare --mount`). Its file
# system (ProtectSystem=strict, ProtectHome=read-only, PrivateTmp=yes, ProtectKernelTunables=yes):
# everything read-only but the API file systems and the state directory argv[1]; an empty /tmp.
# Its seccomp filter: the system calls in argv[2] (SystemCallFilter=~...) fail with EPERM;
# RestrictNamespaces=~user: unshare/clone with CLONE_NEWUSER fail with EPERM, clone3 with ENOSYS;
# RestrictAddressFamilies=: sockets of other families fail with EAFNOSUPPORT. Its devices
# (DevicePolicy=closed, DeviceAllow=): a new devices cgroup (v1) argv[3] with the rules in argv[4].
AS_THE_UNIT = """
import errno, os, subprocess, sys
import pyseccomp as seccomp
os.mkdir(sys.argv[3])
with open(sys.argv[3] + "/devices.deny", "w") as f:
    f.write("a")
for rule in sys.argv[4].split(","):
    with open(sys.argv[3] + "/devices.allow", "w") as f:
        f.write(rule)
with open(sys.argv[3] + "/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
def mount(*args):
    subprocess.run(["mount", *args], check=True)
mount("--make-rprivate", "/")
mount("-o", "remount,bind,ro", "/")
top = os.path.dirname(sys.prefix)  # this checkout, with its .venv: installed outside /tmp in a real unit,
keep = os.open(top, os.O_PATH) if top.startswith("/tmp/") else None  # but a CI clone may lie there
mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/tmp")
if keep is not None:
    os.makedirs(top)
    subprocess.run(["mount", "--no-canonicalize", "--bind", f"/proc/self/fd/{keep}", top], check=True, pass_fds=(keep,))
for path in ("/proc/sys", sys.argv[1]):
    mount("--bind", path, path)
mount("-o", "remount,bind,ro", "/proc/sys")
mount("-o", "remount,bind,rw", sys.argv[1])
eperm, user = seccomp.ERRNO(errno.EPERM), 0x10000000
f = seccomp.SyscallFilter(seccomp.ALLOW)
for name in sys.argv[2].split():
    try:
        f.add_rule(eperm, name)
    except (RuntimeError, ValueError):
        pass  # a name libseccomp does not know on this architecture
for call in ("unshare", "clone"):
    f.add_rule(eperm, call, seccomp.Arg(0, seccomp.MASKED_EQ, user, user))
f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
for family in set(range(46)) - {1, 2, 10, 16}:  # AF_UNIX AF_INET AF_INET6 AF_NETLINK
    f.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, family))
f.load()
os.execvp(sys.argv[5], sys.argv[5:])
"""


DEVICES_CGROUP = Path("/sys/fs/cgroup/devices")
ALWAYS = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/ptmx")


def device_rules() -> str:
    """DevicePolicy=closed and the unit's DeviceAllow= as devices-cgroup rules, as systemd makes them:
    the standard pseudo-devices and pseudo-terminals, the real-time clock read-only (ProtectClock=),
    device nodes by number, device groups by their names in /proc/devices (globs allowed)."""
    groups, section = [], ""
    for line in Path("/proc/devices").read_text().splitlines():
        if line.endswith(":"):
            section = "char" if line.startswith("Character") else "block"
        elif line.strip():
            major, name = line.split()
            groups.append((section, major, name))
    allowed = [f"{path} rw" for path in ALWAYS] + ["char-pts rw", "char-rtc r"] + service_keys()["DeviceAllow"]
    rules = []
    for entry in allowed:
        spec, rights = entry.split()
        if spec.startswith("/dev/"):
            st = os.stat(spec)
            rules.append(f"{'c' if stat.S_ISCHR(st.st_mode) else 'b'} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} "
                         f"{rights}")
        else:
            kind, pattern = spec.split("-", 1)
            rules += [f"{kind[0]} {major}:* {rights}" for section, major, name in groups
                      if section == kind and fnmatch.fnmatch(name, pattern)]
    return ",".join(rules)


def denied_system_calls() -> str:
    """The system calls SystemCallFilter=~GROUPS denies, as systemd-analyze lists them."""
    groups = service_keys()["SystemCallFilter"][0].removeprefix("~").split()
    listed = subprocess.run([ANALYZE, "syscall-filter", *groups], capture_output=True, text=True, check=True).stdout
    return " ".join(line.strip() for line in listed.splitlines()
                    if line.startswith(" ") and not line.strip().startswith(("#", "@")))


@pytest.mark.skipif(os.geteuid() != 0 or None in (shutil.which("setpriv"), shutil.which("unshare"), ANALYZE)
                    or not (DEVICES_CGROUP / "devices.allow").exists(),
                    reason="needs root, setpriv and unshare (util-linux), systemd-analyze and a cgroup v1 devices "
                           "hierarchy to start the service as the unit would")
def test_the_service_does_its_job_inside_the_units_sandbox(tmp_path):
    caps = ",".join("+" + cap.removeprefix("CAP_").lower() for cap in sorted(bounding_set()))
    devices = DEVICES_CGROUP / f"taichi-sandbox-test-{os.getpid()}"
    prefix = ("unshare", "--mount", "--", sys.executable, "-c", AS_THE_UNIT, str(tmp_path), denied_system_calls(),
              str(devices), device_rules(),
              "setpriv", "--bounding-set", f"-all,{caps}", "--inh-caps", "-all", "--no-new-privs", "--")
    own = int(re.search(r"CapBnd:\s*([0-9a-f]+)", Path("/proc/self/status").read_text()).group(1), 16)
    try:
        node = Node(tmp_path / "node", prefix=prefix)
    except BaseException:
        devices.rmdir()
        raise
    try:
        status = Path(f"/proc/{node.proc.pid}/status").read_text()
        bounding = int(re.search(r"CapBnd:\s*([0-9a-f]+)", status).group(1), 16)
        assert bounding == own & sum(1 << CAPABILITY_NUMBERS[cap] for cap in CAPABILITIES)
        assert "NoNewPrivs:\t1" in status
        assert "Seccomp:\t2" in status
        assert "devices:/" + devices.name in Path(f"/proc/{node.proc.pid}/cgroup").read_text()
        mounts = {line.split()[4]: line.split() for line in Path(f"/proc/{node.proc.pid}/mountinfo").read_text()
                  .splitlines()}
        assert "ro" in mounts["/"][5].split(",") and "ro" in mounts["/proc/sys"][5].split(",")
        assert "tmpfs" in mounts["/tmp"] and "rw" in mounts[str(tmp_path)][5].split(",")
        jobs = [{"kernel": "who.py", "tenant": "bob", "source": "import os, socket\nprint(os.getuid(), "
                 "socket.gethostname(), sorted(os.listdir('/proc'))[:1])\n"},
                {"kernel": "disk.py", "tenant": "bob", "limits": {"disk": "64MiB"},
                 "source": "open('big', 'wb').write(b'x' * (100 << 20))\n"},
                {"kernel": "slow.py", "tenant": "bob", "limits": {"wall_time": "1s"},  # killed: a tenant's uid
                 "source": "import os, time\nos.fork()\ntime.sleep(60)\n"},
                {"kernel": "out.py", "tenant": "bob", "outputs": ["r.txt"],  # copied back for the client
                 "source": "import os\nopen('r.txt', 'w').write('r')\nos.chmod('r.txt', 0o400)\n"}]
        answers = node.ask({"op": "submit", "jobs": jobs, "follow": True})
    finally:
        assert node.stop() == 0
        devices.rmdir()
    results = {a["result"]["kernel"]: a["result"] for a in answers if a["type"] == "result"}
    assert results["who.py"]["verdict"] == "ok", results["who.py"]
    uid, hostname = results["who.py"]["stdout_tail"].split()[:2]
    assert int(uid) >= 60000 and hostname == "taichi-sandbox"  # a tenant uid, in its own namespaces
    disk = results["disk.py"]
    assert disk["verdict"] == "disk" and "loop device" in disk["enforcement"]["disk"]["by"], json.dumps(disk)[:2000]
    assert results["slow.py"]["verdict"] == "wall_time" and results["out.py"]["verdict"] == "ok"
    assert [a["name"] for a in answers if a["type"] == "file"] == ["r.txt"]
