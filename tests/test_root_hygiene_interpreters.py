"""Interpreters the root side starts: nothing a tenant or a caller's directory holds runs in them.

Each attack plants code where a root interpreter would pick it up before the job is confined: a job
input named like a module the exec launcher's child imports (the child started in the job's work
dir, which was first on its `sys.path`), a job environment with PYTHONPATH or LD_PRELOAD (the exec
launcher started its interpreter with it), and a `ctypes.py` in the directory a root operator stands
in when the namespace probe runs. The planted code writes a marker, with the uid it ran as, into a
directory only root can write: a marker means root ran it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sandbox import JobSpec, Supervisor, Verdict
from sandbox.job import namespaces

from .conftest import kernel, make_policy

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the attacks are on code that runs as root")

# A module that records who imported it, then steps aside for the real one (the job still succeeds).
PLANTED = """
import importlib, os, sys
try:
    with open({marker!r}, "w") as f:
        f.write(str(os.geteuid()))
except OSError:
    pass
here = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
del sys.modules[__name__]
sys.modules[__name__] = importlib.import_module(__name__)
"""

CONSTRUCTOR = """
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen("%s", "w");
    if (f) { fprintf(f, "%%d", (int)geteuid()); fclose(f); }
}
"""


@pytest.fixture
def marker(tmp_path) -> Path:
    """Where planted code leaves its mark: a directory only root may write."""
    drop = tmp_path / "root-only"
    drop.mkdir(mode=0o700)
    return drop / "ran"


@pytest.fixture(scope="module")
def exec_supervisor(tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    with Supervisor(make_policy(state), launcher="exec", audit_log=state / "audit.jsonl") as sup:
        yield sup


@pytest.mark.parametrize("module", ["pydantic", "ctypes"])
def test_an_input_named_like_a_module_the_child_imports_does_not_run_as_root(exec_supervisor, tmp_path, marker,
                                                                            module):
    planted = tmp_path / f"{module}.py"
    planted.write_text(PLANTED.format(marker=str(marker)))
    r = exec_supervisor.run(JobSpec(kernel=kernel("tiny.py"), inputs=[str(planted)]))
    assert not marker.exists(), f"{module}.py from the job's inputs ran as uid {marker.read_text()}"
    assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)


def _sitecustomize(tmp_path: Path, marker: Path) -> dict[str, str]:
    path = tmp_path / "pythonpath"
    path.mkdir()
    (path / "sitecustomize.py").write_text(PLANTED.format(marker=str(marker)))
    return {"PYTHONPATH": str(path)}


def _preload(tmp_path: Path, marker: Path) -> dict[str, str]:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the preloaded library")
    source, library = tmp_path / "planted.c", tmp_path / "planted.so"
    source.write_text(CONSTRUCTOR % marker)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return {"LD_PRELOAD": str(library)}


@pytest.mark.parametrize("plant", [_sitecustomize, _preload], ids=["PYTHONPATH", "LD_PRELOAD"])
def test_a_jobs_environment_does_not_reach_the_root_interpreter(exec_supervisor, tmp_path, marker, plant):
    r = exec_supervisor.run(JobSpec(kernel=kernel("tiny.py"), env=plant(tmp_path, marker)))
    assert not marker.exists(), f"the job's environment ran code as uid {marker.read_text()}"
    assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)


def test_the_job_still_gets_its_environment_after_confinement(exec_supervisor, tmp_path):
    script = tmp_path / "env.py"
    script.write_text("import os\nprint(os.environ['PYTHONPATH'], os.environ['MINE'], os.geteuid())\n")
    r = exec_supervisor.run(JobSpec(kernel=str(script), env={"PYTHONPATH": "/nowhere", "MINE": "x"}))
    assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)
    path, mine, uid = r.stdout_tail.split()
    assert (path, mine) == ("/nowhere", "x") and (int(uid) != 0 or exec_supervisor.namespaces_unavailable())


def test_a_ctypes_py_in_the_operators_cwd_does_not_run_in_the_namespace_probe(tmp_path, marker, monkeypatch):
    (tmp_path / "ctypes.py").write_text(PLANTED.format(marker=str(marker)))
    monkeypatch.chdir(tmp_path)
    namespaces.probe()
    assert not marker.exists(), f"ctypes.py in the operator's cwd ran as uid {marker.read_text()}"
