"""Attacks on the files a root supervisor touches for a job: the output copy, the input copy, and
the removal of the job's dir. Each runs as root with a real tenant uid (a job of tenant "alice")."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from sandbox import ConfigError, JobSpec, Limits, Supervisor, Verdict

from .test_cli import cli

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="a root supervisor runs jobs as a tenant's uid")
SECRET = "root's secret, mode 0600"


def _tenant_supervisor(state: Path) -> Supervisor:
    from sandbox import Policy
    from sandbox.core.limits import Settings, Tenant
    return Supervisor(Policy(tenants={"alice": Tenant()}, settings=Settings(state_dir=str(state))),
                      audit_log=state / "audit.jsonl")


def _alice(sup: Supervisor) -> tuple[int, int]:
    from sandbox.job.ids import tenant_ids
    ids = tenant_ids(sup.policy, "alice")
    return ids.uid, ids.gid


def _job(tmp_path: Path, body: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def _run(sup: Supervisor, **fields):
    spec = JobSpec(tenant="alice", limits=Limits(memory="1GiB", wall_time="60s"), **fields)
    return sup.run(spec)


WRITE_OUTPUTS = """
    import os
    os.makedirs("sub")
    open("sub/planted.txt", "w").write("written by the job")
    open("kept.txt", "w").write("the job's kept.txt")
"""


@root_only
def test_a_symlink_planted_inside_the_output_dir_does_not_make_root_write_elsewhere(tmp_path):
    victim = tmp_path / "victim"  # a root-only directory outside the output dir
    victim.mkdir(mode=0o700)
    out = tmp_path / "out"
    out.mkdir()
    with _tenant_supervisor(tmp_path / "state") as sup:
        uid, gid = _alice(sup)
        os.chown(out, uid, gid)  # the tenant can write inside the output dir: it plants sub -> victim
        (out / "sub").symlink_to(victim)
        os.lchown(out / "sub", uid, gid)
        r = _run(sup, kernel=_job(tmp_path, WRITE_OUTPUTS), outputs=["*"], output_dir=str(out))
    assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)
    assert list(victim.iterdir()) == [], "root created a file through the planted symlink"
    assert (out / "kept.txt").read_text() == "the job's kept.txt" and r.outputs == [str(out / "kept.txt")]
    assert any("sub/planted.txt" in n and "symlink" in n for n in r.notes), r.notes


@root_only
def test_an_existing_file_in_the_output_dir_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "kept.txt").write_text("precious")
    with _tenant_supervisor(tmp_path / "state") as sup:
        r = _run(sup, kernel=_job(tmp_path, WRITE_OUTPUTS), outputs=["*"], output_dir=str(out))
    assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)
    assert (out / "kept.txt").read_text() == "precious"
    assert (out / "sub" / "planted.txt").read_text() == "written by the job"
    assert r.outputs == [str(out / "sub" / "planted.txt")]
    assert any("kept.txt" in n and "exist" in n for n in r.notes), r.notes


READ_INPUT = """
    print(open("in.txt").read())
"""


@root_only
def test_an_input_symlinked_into_a_directory_the_tenant_cannot_pass_is_refused(tmp_path):
    hidden = tmp_path / "hidden"  # root's 0700 directory: the file in it is 0644, but alice cannot reach it
    hidden.mkdir(mode=0o700)
    (hidden / "readable.txt").write_text(SECRET)
    (hidden / "readable.txt").chmod(0o644)
    drop = tmp_path / "drop"
    drop.mkdir()
    with _tenant_supervisor(tmp_path / "state") as sup:
        uid, gid = _alice(sup)
        os.chown(drop, uid, gid)  # where the operator takes the input from: the tenant writes there
        (drop / "in.txt").symlink_to(hidden / "readable.txt")
        r = _run(sup, kernel=_job(tmp_path, READ_INPUT), inputs=[str(drop / "in.txt")])
    assert SECRET not in r.stdout_tail
    assert r.verdict is Verdict.rejected and "not readable by the job's uid" in r.reason, r.reason


EXCHANGER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = (os.fsencode(p) for p in sys.argv[1:3])
print("ready", flush=True)
while True:
    if libc.syscall(316, -100, a, -100, b, 2) != 0:  # renameat2(AT_FDCWD, a, AT_FDCWD, b, RENAME_EXCHANGE)
        sys.exit(ctypes.get_errno())
"""


@root_only
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="renameat2 is syscall 316 on x86_64")
def test_an_input_swapped_for_a_symlink_to_a_root_only_file_mid_copy_never_reaches_the_job(tmp_path):
    """A process of the tenant swaps the input's name with a symlink to root's 0600 file as fast as
    it can (rename-exchange: both names always exist) while the input is staged again and again."""
    from sandbox.job.inputs import stage
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "in.txt").write_text("harmless")
    (drop / "link").symlink_to(secret)
    with _tenant_supervisor(tmp_path / "state") as sup:
        uid, gid = _alice(sup)
    for path in (drop, drop / "in.txt", drop / "link"):
        os.lchown(path, uid, gid)
    # As alice where an interpreter she may run is at hand (the venv's may sit under a 0700 home);
    # who renames makes no difference to the supervisor, which sees only the names.
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else None
    swapper = subprocess.Popen([python or sys.executable, "-c", EXCHANGER, str(drop / "in.txt"), str(drop / "link")],
                               user=uid if python else None, group=gid if python else None,
                               extra_groups=[] if python else None, stdout=subprocess.PIPE, text=True)
    leaks, staged, refused, tries = 0, 0, 0, 0
    try:
        assert swapper.stdout.readline() == "ready\n"
        deadline = time.monotonic() + 15
        while tries < 3000 and time.monotonic() < deadline and not leaks:
            tries += 1
            job_dir = Path(tempfile.mkdtemp(dir=tmp_path))
            try:
                stage([(str(drop / "in.txt"), "in.txt")], None, str(job_dir), (uid, gid))
            except ConfigError:
                refused += 1
                continue
            finally:
                assert swapper.poll() is None, "the swapping process stopped"
            staged += 1
            leaks += (job_dir / "in.txt").read_text() == SECRET
    finally:
        swapper.kill()
        swapper.wait()
    assert leaks == 0, f"the job's copy held root's file in {leaks} of {tries} tries"
    assert staged and refused, f"the race did not run both ways: {staged} staged, {refused} refused"


DEEP = """
    import os
    for _ in range(5000):
        os.mkdir("d")
        os.chdir("d")
    print("built")
"""


@root_only
def test_a_5000_deep_directory_chain_does_not_lose_the_verdict_or_leave_the_job_dir(tmp_path):
    with _tenant_supervisor(tmp_path / "state") as sup:
        r = _run(sup, kernel=_job(tmp_path, DEEP))
    assert r.verdict is Verdict.ok, (r.reason, r.stderr_tail)
    assert not glob.glob(f"/tmp/tsbx-{r.job_id}-*"), "the job's dir was left on disk"
    records = [json.loads(line) for line in (tmp_path / "state" / "audit.jsonl").read_text().splitlines()]
    assert [x["verdict"] for x in records if x["type"] == "job" and x["job_id"] == r.job_id] == ["ok"]


@root_only
def test_a_5000_deep_directory_chain_through_the_cli_exits_with_the_jobs_verdict(tmp_path):
    p = cli("run", _job(tmp_path, DEEP), "--json", tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    job_id = json.loads(p.stdout)["job_id"]
    audit = tmp_path / "taichi-sandbox" / "audit.jsonl"
    assert any(json.loads(line).get("type") == "job" and json.loads(line)["job_id"] == job_id
               for line in audit.read_text().splitlines())
    assert not glob.glob(f"/tmp/tsbx-{job_id}-*")


@root_only
def test_a_symlink_planted_in_a_clients_output_dir_does_not_redirect_its_saved_files(tmp_path):
    from sandbox.remote import save_file
    victim, out = tmp_path / "victim", tmp_path / "out"
    victim.mkdir()
    out.mkdir()
    (out / "sub").symlink_to(victim)
    (out / "kept.txt").write_text("precious")
    for name in ("sub/planted.txt", "kept.txt"):
        fd = os.open(__file__, os.O_RDONLY)
        with pytest.raises(OSError):
            save_file(str(out), {"fd": fd, "name": name})
    assert list(victim.iterdir()) == [] and (out / "kept.txt").read_text() == "precious"


# --- the primitives (sandbox.job.safefs) --------------------------------------------------------


@pytest.fixture(params=["openat2", "walk"])
def resolution(request, monkeypatch):
    """Both ways below a directory descriptor: openat2 (where the kernel has it) and the walk."""
    from sandbox.job import safefs
    if request.param == "walk":
        monkeypatch.setattr(safefs, "_has_openat2", False)
    elif safefs._openat2(os.open("/", os.O_RDONLY), ".", os.O_RDONLY | os.O_DIRECTORY, 0) is None:
        pytest.skip("this kernel has no openat2")
    return safefs


def test_open_beneath_follows_no_symlink_and_never_leaves_its_directory(tmp_path, resolution):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_text("inside")
    (tmp_path / "up").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "last").symlink_to(tmp_path / "a" / "b" / "f")
    top = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = resolution.open_beneath(top, "a/b/f", os.O_RDONLY)
        assert os.read(fd, 100) == b"inside"
        os.close(fd)
        for rel in ("up/b/f", "a/last", "a/../a/b/f", "/etc/passwd", "../x"):
            with pytest.raises(OSError):
                os.close(resolution.open_beneath(top, rel, os.O_RDONLY))
    finally:
        os.close(top)


def test_create_beneath_never_replaces_a_name(tmp_path):
    from sandbox.job.safefs import create_beneath
    (tmp_path / "file").write_text("kept")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    top = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in ("file", "link"):
            with pytest.raises(FileExistsError):
                create_beneath(top, name)
        with pytest.raises(OSError):  # "file" is no directory
            create_beneath(top, "file/x")
        os.close(create_beneath(top, "new/dir/x"))
    finally:
        os.close(top)
    assert (tmp_path / "file").read_text() == "kept" and not (tmp_path / "elsewhere").exists()
    assert (tmp_path / "new" / "dir" / "x").is_file()


def _thread_ids() -> dict[str, str]:
    lines = Path("/proc/thread-self/status").read_text().splitlines()
    return {k: v.split() for k, v in (line.split(":", 1) for line in lines) if k in ("Uid", "Gid", "Groups")}


@root_only
def test_open_as_opens_with_the_tenants_rights_only_and_restores_roots(tmp_path):
    from sandbox.job.safefs import open_as
    hidden = tmp_path / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "f").write_text("x")
    (hidden / "f").chmod(0o644)
    (tmp_path / "open").write_text("y")
    before = _thread_ids()
    with pytest.raises(PermissionError):
        open_as(str(hidden / "f"), os.O_RDONLY, (60990, 60990))
    os.close(open_as(str(tmp_path / "open"), os.O_RDONLY, (60990, 60990)))
    assert _thread_ids() == before
    os.close(os.open(hidden / "f", os.O_RDONLY))  # root's rights are back


def test_remove_tree_removes_what_is_at_its_path_without_following_it(tmp_path):
    from sandbox.job.safefs import remove_tree
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "kept").write_text("kept")
    (tmp_path / "link").symlink_to(tmp_path / "outside")
    (tmp_path / "file").write_text("x")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "to-outside").symlink_to(tmp_path / "outside")
    os.link(tmp_path / "outside" / "kept", tree / "a" / "hard")
    (tree / "a" / "fifo").parent.mkdir(exist_ok=True)
    os.mkfifo(tree / "a" / "fifo")
    for path in (tmp_path / "link", tmp_path / "file", tree, tmp_path / "missing"):
        assert remove_tree(path) is None
        assert not os.path.lexists(path)
    assert (tmp_path / "outside" / "kept").read_text() == "kept"


@root_only
def test_remove_tree_does_not_enter_a_mount_and_names_what_it_left(tmp_path):
    from sandbox.job.safefs import remove_tree
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept").write_text("kept")
    tree = tmp_path / "tree"
    (tree / "x" / "mnt").mkdir(parents=True)
    (tree / "y").write_text("gone")
    subprocess.run(["mount", "--bind", str(outside), str(tree / "x" / "mnt")], check=True)
    try:
        note = remove_tree(tree)
    finally:
        subprocess.run(["umount", str(tree / "x" / "mnt")], check=True)
    assert (outside / "kept").read_text() == "kept"
    assert note is not None and "x/mnt: another file system is mounted there" in note, note
    assert sorted(p.name for p in tree.rglob("*")) == ["mnt", "x"]
    assert remove_tree(tree) is None and not tree.exists()


def test_remove_tree_is_bounded_in_time_and_says_so(tmp_path):
    from sandbox.job.safefs import remove_tree
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    note = remove_tree(tree, seconds=0)
    assert note is not None and f"{tree} left on disk" in note and "out of time" in note, note
    assert remove_tree(tree) is None and not tree.exists()


GARBLED = r"""
    import os
    os.close(os.open(b"out-\xff.txt", os.O_WRONLY | os.O_CREAT, 0o644))
    open("plain.txt", "w").write("fine")
    raise ValueError("\udcff")
"""


@root_only
def test_file_names_and_messages_that_are_not_utf8_do_not_break_the_clis_json_result(tmp_path):
    """A file the job names in bytes that are not UTF-8, and an error message with a lone surrogate
    (a JSON \\u escape spells one), reached the result as strings no UTF-8 JSON can hold: the CLI's
    `--json` died with a traceback instead of printing the verdict."""
    out = tmp_path / "out"
    p = cli("run", _job(tmp_path, GARBLED), "--json", "--output-dir", str(out), tmp_path=tmp_path)
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    result = json.loads(p.stdout)
    assert result["verdict"] == "error" and result["error_type"] == "ValueError", result
    assert [Path(o).name for o in result["outputs"]] == ["plain.txt"] and os.listdir(out) == ["plain.txt"]
    assert any("not UTF-8" in note for note in result["notes"]), result["notes"]
