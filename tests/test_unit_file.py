"""The systemd units in deploy/: they parse (`systemd-analyze verify`, where installed, else a
structural check), keep their hardening and reload keys, score what docs/operators.md says
(`systemd-analyze security --offline`), and the service does its whole job inside the capability
bounding set and no_new_privs the unit gives it (a real service under setpriv, real jobs as
tenant uids in namespaces, cgroups and a disk image)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
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
CAPABILITIES = {"CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_CHOWN",
                "CAP_DAC_OVERRIDE", "CAP_KILL", "CAP_NET_ADMIN", "CAP_SYS_RESOURCE"}


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


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv (util-linux) to start the service with the unit's capabilities")
def test_the_service_does_its_job_inside_the_units_capability_bounding_set(tmp_path):
    caps = ",".join("+" + cap.removeprefix("CAP_").lower() for cap in sorted(bounding_set()))
    prefix = ("setpriv", "--bounding-set", f"-all,{caps}", "--inh-caps", "-all", "--no-new-privs", "--")
    node = Node(tmp_path / "node", prefix=prefix, extra="")
    try:
        status = Path(f"/proc/{node.proc.pid}/status").read_text()
        bounding = int(re.search(r"CapBnd:\s*([0-9a-f]+)", status).group(1), 16)
        assert bin(bounding).count("1") <= len(CAPABILITIES) and "NoNewPrivs:\t1" in status
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
    results = {a["result"]["kernel"]: a["result"] for a in answers if a["type"] == "result"}
    assert results["who.py"]["verdict"] == "ok", results["who.py"]
    uid, hostname = results["who.py"]["stdout_tail"].split()[:2]
    assert int(uid) >= 60000 and hostname == "taichi-sandbox"  # a tenant uid, in its own namespaces
    assert results["disk.py"]["verdict"] == "disk", json.dumps(results["disk.py"])[:2000]
    assert results["slow.py"]["verdict"] == "wall_time" and results["out.py"]["verdict"] == "ok"
    assert [a["name"] for a in answers if a["type"] == "file"] == ["r.txt"]
