"""The pytest plugin behaves like pytest: real pytest sessions (pytester, in this process, with a
supervisor of the test's own) whose sandboxed tests run as real jobs (arch=cpu); and JobSpec.binds,
the mechanism that brings `tmp_path` into the job, attacked directly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import dill  # noqa: F401  before pytester: its in-process sessions drop the modules first imported in them,
import pytest  # and a second dill cannot pickle what the first one made (later tests' shipping broke)

from sandbox import JobSpec, Supervisor, api
from sandbox.job.binds import lendable_below
from tests.conftest import make_policy
from tests.test_isolation import AS_UID, WRITE_AROUND

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="jobs run as a tenant's uid only under a root supervisor")


@pytest.fixture(scope="module")
def plugin_supervisor(tmp_path_factory):
    """The supervisor run_kernel uses while these sessions run (the process-wide default)."""
    state = tmp_path_factory.mktemp("plugin-state")
    saved = api._default
    with Supervisor(make_policy(state), audit_log=state / "audit.jsonl") as sup:
        api._default = sup
        try:
            yield sup
        finally:
            api._default = saved


@pytest.fixture
def session(pytester, plugin_supervisor):
    """Run a pytest session on `source` (a test module); returns pytester's RunResult."""
    def run(source: str, *args: str):
        pytester.makepyfile(test_inner=source)
        return pytester.runpytest("-p", "no:cacheprovider", "-rA", *args)
    return run


# --- tmp_path and tmp_path_factory -----------------------------------------------------------------

TMP_PATH = '''
import os, pytest

@pytest.fixture
def checked_after(tmp_path):
    yield tmp_path
    assert (tmp_path / "out.txt").read_text() == "from the job"
    assert tmp_path.stat().st_uid == os.getuid() and not (tmp_path / "evil").exists()
    print("checked after the job")

@pytest.mark.sandbox(cpu_time="20s")
def test_writes(checked_after, tmp_path):
    assert os.environ.get("TAICHI_SANDBOX_JOB") and checked_after == tmp_path and tmp_path.is_dir()
    (tmp_path / "out.txt").write_text("from the job")
    os.symlink("/etc/passwd", tmp_path / "evil")  # would lead the test's later code elsewhere

@pytest.mark.sandbox
def test_factory(tmp_path_factory):
    made = tmp_path_factory.mktemp("made")
    (made / "f.txt").write_text("x")
    print("made", made)

def test_factory_dirs_are_seen_here(tmp_path_factory):
    found = list(tmp_path_factory.getbasetemp().glob("test_factory-factory[0-9]*/made[0-9]*/f.txt"))
    assert [p.read_text() for p in found] == ["x"]
'''


def test_tmp_path_is_bound_into_the_job_and_what_it_writes_is_seen_after(session):
    r = session(TMP_PATH, "-v")
    r.assert_outcomes(passed=3)
    r.stdout.fnmatch_lines(["*checked after the job*"])


IMPOSTOR = '''
import pytest

@pytest.fixture
def tmp_path():
    return __import__("pathlib").Path("/etc")

@pytest.mark.sandbox
def test_escapes(tmp_path):
    (tmp_path / "owned").write_text("x")
'''


def test_a_tmp_path_pytest_did_not_make_is_not_bound(session):
    r = session(IMPOSTOR)
    r.assert_outcomes(failed=1)
    r.stdout.fnmatch_lines(["*/etc is not a directory pytest made under its base temp directory*not bound*"])
    assert not Path("/etc/owned").exists()


# --- JobSpec.binds attacked directly -------------------------------------------------------------

def _write_around(where: Path, paths: list[Path], binds: list[Path], supervisor) -> tuple:
    """A job that tries to write each path (test_isolation's WRITE_AROUND), with `binds`: (result, what it found)."""
    script = where / "write_around.py"
    script.write_text(WRITE_AROUND)
    r = supervisor.run(JobSpec(kernel=str(script), argv=[str(p) for p in paths], binds=[str(b) for b in binds]))
    return r, (json.loads(r.stdout_tail) if r.ok else {})


def _private_dir(parent: Path, name: str) -> Path:
    path = parent / name
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def own_tmp(tmp_path, tmp_path_factory) -> Path:
    """tmp_path as pytest makes it: writable by its owner only (conftest opens it to a root's jobs),
    below a directory a root supervisor may lend from (as the plugin names it)."""
    lendable_below(str(tmp_path_factory.getbasetemp()))
    tmp_path.chmod(0o755)
    return tmp_path


def test_binds_refuse_symlinks_other_owners_and_open_parents(own_tmp, supervisor):
    real = _private_dir(own_tmp, "real")
    (own_tmp / "link").symlink_to(real)
    open_parent = own_tmp / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)  # anyone could swap what is below it
    others = _private_dir(own_tmp, "others")
    os.chown(others, 65534, 65534) if os.geteuid() == 0 else None
    refused = {str(own_tmp / "link"): f"{own_tmp / 'link'} is a symlink",
               str(_private_dir(open_parent, "inside")): f"{open_parent} can be changed by others",
               str(own_tmp / "none"): "No such file or directory",
               str(others) if os.geteuid() == 0 else "/etc": "belongs to uid " + ("65534" if os.geteuid() == 0 else "0")}
    for path, why in refused.items():
        r = supervisor.run(JobSpec(kernel="nothing.py", binds=[path]))
        assert r.verdict.value == "rejected" and r.reason.startswith(f"binds: {path}: ") and why in r.reason, r.reason
    assert real.stat().st_uid == os.geteuid()
    with pytest.raises(Exception, match="absolute, normalized"):
        JobSpec(kernel="x.py", binds=["relative/dir"])


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root supervisor lends directories (needs root)")
def test_a_root_supervisor_lends_no_directory_outside_the_temp_dir(supervisor):
    """Lending changes the directory's owner to the tenant for the job: a root caller's `binds=["/etc"]`
    (root's own directory, so the ownership rule passes) would hand /etc to a tenant."""
    before = os.stat("/etc")
    for path in ("/etc", "/usr/lib", tempfile.gettempdir()):
        r = supervisor.run(JobSpec(kernel="nothing.py", binds=[path]))
        assert r.verdict.value == "rejected" and "lends only directories below" in r.reason, r.reason
    assert (os.stat("/etc").st_uid, os.stat("/etc").st_gid) == (before.st_uid, before.st_gid)


def test_a_job_writes_only_in_its_bind_and_gets_it_back_clean(own_tmp, supervisor):
    base = _private_dir(own_tmp, "base")
    bound, beside = _private_dir(base, "bound"), _private_dir(base, "beside")
    r, found = _write_around(own_tmp, [bound / "in.txt", beside / "x.txt", base / "y.txt"], [bound], supervisor)
    assert r.ok, (r.reason, r.traceback)
    assert found[str(bound / "in.txt")] == "written" and (bound / "in.txt").read_text() == "left behind"
    if os.geteuid() == 0 and supervisor.namespaces_unavailable() is None:  # the job runs as its tenant's uid
        assert found[str(beside / "x.txt")] != "written" and found[str(base / "y.txt")] != "written"
        assert (bound / "in.txt").stat().st_uid != 0 and bound.stat().st_uid == 0  # handed back


def _plant(path: str) -> None:
    os.symlink("/etc/shadow", os.path.join(path, "shadow"))
    os.makedirs(os.path.join(path, "deep", "er"))
    os.symlink("/root", os.path.join(path, "deep", "er", "home"))


@root_only
def test_symlinks_a_job_leaves_in_a_lent_bind_are_removed_and_named(own_tmp, supervisor):
    bound = _private_dir(own_tmp, "bound")
    r = supervisor.run(JobSpec(kernel=_plant, args=[str(bound)], binds=[str(bound)]))
    assert r.ok, (r.reason, r.traceback)
    if supervisor.namespaces_unavailable() is None:
        assert not (bound / "shadow").is_symlink() and not (bound / "deep/er/home").is_symlink()
        assert any("removed 2 symlink(s)" in n and str(bound / "shadow") in n for n in r.notes), r.notes


def test_neither_the_service_nor_ray_binds_a_path():
    """The service's client is another user, a Ray task may run on another machine: binds are for
    jobs run in the caller's own process."""
    from sandbox import ConfigError, ray
    from sandbox.node.protocol import JobRequest, ProtocolError
    with pytest.raises(ProtocolError, match="binds: the service never binds"):
        JobRequest(kernel="x.py", binds=["/home/alice"]).spec(None, 0, Path("/nonexistent"))
    with pytest.raises(ConfigError, match="binds: a Ray task may run on another machine"):
        ray.submit(JobSpec(kernel="x.py", binds=["/home/alice"]))


# --- asserts, outcomes, output --------------------------------------------------------------------

OUTCOMES = '''
import pytest

@pytest.mark.sandbox(memory="1GiB")
def test_assert():
    values = [1, 2]
    print("progress in the job")
    assert len(values) == 3, "lengths"

@pytest.mark.sandbox
def test_skip():
    pytest.skip("not on this machine")

@pytest.mark.sandbox
def test_importorskip():
    pytest.importorskip("no_such_module_here")

@pytest.mark.sandbox
def test_xfail_call():
    pytest.xfail("known bug")

@pytest.mark.sandbox
@pytest.mark.xfail(raises=ZeroDivisionError, strict=True)
def test_xfail_marker():
    1 / 0

@pytest.mark.sandbox
@pytest.mark.xfail(raises=KeyError)
def test_xfail_other_error():
    1 / 0

@pytest.mark.sandbox
def test_fail():
    pytest.fail("told to")

@pytest.mark.sandbox(memory="300MiB")
def test_hog():
    import numpy as np
    blocks = [np.ones(64 << 20, np.uint8) for _ in range(16)]
'''


def test_asserts_skips_xfails_and_fails_are_pytest_outcomes(session):
    r = session(OUTCOMES)
    r.assert_outcomes(failed=4, skipped=2, xfailed=2)
    r.stdout.fnmatch_lines([
        "*(the test's traceback in the job):",
        '*test_inner.py", line 7, in test_assert',
        "*assert len(values) == 3*",
        "E   AssertionError: lengths",
        "E   assert 2 == 3",
        "E    +  where 2 = len([[]1, 2[]])",
        "*Captured stdout call*",
        "progress in the job",
    ])
    out = r.stdout.str()
    for line in ("FAILED test_inner.py::test_assert - AssertionError: lengths",
                 "SKIPPED [1] test_inner.py:9: not on this machine",
                 "SKIPPED [1] test_inner.py:13: could not import 'no_such_module_here'",
                 "XFAIL test_inner.py::test_xfail_call - known bug", "XFAIL test_inner.py::test_xfail_marker",
                 "FAILED test_inner.py::test_xfail_other_error - ZeroDivisionError: division by",
                 "FAILED test_inner.py::test_fail - Failed: told to", "FAILED test_inner.py::test_hog - sandbox verdict memory"):
        assert line in out, out[-6000:]
    assert "sandbox/job/child.py" not in out and "_pytest/outcomes.py" not in out  # the sandbox's frames and pytest's


def test_with_dash_s_the_jobs_output_is_shown(session):
    r = session('import pytest\n\n@pytest.mark.sandbox\ndef test_prints():\n    print("live from the job")\n', "-s")
    r.assert_outcomes(passed=1)
    r.stdout.fnmatch_lines(["*live from the job*"])


# --- fixtures that cannot cross, the marker ------------------------------------------------------

FIXTURES = '''
import pytest

@pytest.fixture
def numbers():
    return (i for i in range(3))

@pytest.mark.sandbox
def test_monkeypatch(monkeypatch):
    pass

@pytest.mark.sandbox
def test_request(request):
    pass

@pytest.mark.sandbox
def test_capsys(capsys):
    pass

@pytest.mark.sandbox
def test_generator(numbers):
    pass
'''


def test_fixtures_that_cannot_cross_get_one_line_naming_them(session):
    r = session(FIXTURES)
    r.assert_outcomes(failed=4)
    out = r.stdout.str()
    for name, what in (("monkeypatch", "@pytest.mark.sandbox(env={...})"), ("request", "not sandboxed"),
                       ("capsys", "captured output"), ("numbers", "TypeError: cannot pickle 'generator' object")):
        line = next(line for line in out.splitlines() if line.startswith(f"fixture '{name}' cannot cross into the sandbox: "))
        assert what in line, line
    assert "Traceback" not in out and "During handling" not in out and "dill" not in out


def test_marker_keywords_are_checked_before_tests_run(session):
    r = session('import pytest\n\n@pytest.mark.sandbox(memroy="1GiB")\ndef test_x():\n    pass\n')
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    r.stderr.fnmatch_lines(["ERROR: test_inner.py::test_x: @pytest.mark.sandbox: unknown keyword 'memroy' "
                            "(did you mean 'memory'?)"])
    r = session('import pytest\n\n@pytest.mark.sandbox(cpu_time="soon")\ndef test_x():\n    pass\n')
    assert r.ret == pytest.ExitCode.USAGE_ERROR and "cpu_time" in r.stderr.str() and "Traceback" not in r.stderr.str()
    r = session('import os, pytest\n\n@pytest.mark.sandbox(cpu_time="unlimited", memory="unlimited", env={"K": "v"})\n'
                'def test_x():\n    assert os.environ["K"] == "v"\n')
    r.assert_outcomes(passed=1)


# --- a user without root ---------------------------------------------------------------------------

OPERATOR_UID = 59998


@root_only
def test_a_user_without_root_gets_tmp_path_in_the_job(tmp_path):
    """pytest run by an unprivileged uid: its jobs (in a user namespace where the host allows one)
    see tmp_path, under its own private /tmp too."""
    home = tmp_path / "operator"
    home.mkdir()
    (home / "test_mine.py").write_text(TMP_PATH)
    os.chown(home, OPERATOR_UID, OPERATOR_UID)
    os.chown(home / "test_mine.py", OPERATOR_UID, OPERATOR_UID)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "XDG_STATE_HOME": str(home / "state"),
           "TAICHI_SANDBOX_LIMITS": str(ROOT / "limits.toml")}
    done = subprocess.run([sys.executable, "-c", AS_UID, str(OPERATOR_UID), "import pytest; raise SystemExit(pytest.main())",
                           "-p", "no:cacheprovider", "-q", "-rA", "test_mine.py"], capture_output=True, text=True, cwd=home, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 passed" in done.stdout and "/tmp/pytest-of-" in done.stdout
