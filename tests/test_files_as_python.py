"""Files as `python kernel.py` users expect: inputs at the relative paths the script uses, the files
it leaves back in the caller's directory (new files only), a hint for a file it was not given, and
nothing dropped without a word, from `taichi-sandbox run`, `run_kernel` and `@sandboxed` alike."""

from __future__ import annotations

import json
import os
import textwrap
import warnings

import numpy as np
import pytest

from sandbox import ConfigError, FilesWarning, JobSpec, Verdict, run_kernel, sandboxed

from .test_cli import cli

WRITES = """
    import os
    import numpy as np
    np.save("result.npy", np.arange(3))
    os.makedirs("frames/a", exist_ok=True)
    open("frames/a/f0.txt", "w").write("frame 0")
"""
READS = """
    import numpy as np
    print(np.load("data/init.npy").sum())
"""


def write(path, body: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(body))
    return str(path)


def save(path, values) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(values))


def test_run_leaves_the_jobs_files_in_the_cwd_and_never_overwrites(tmp_path):
    write(tmp_path / "writes_output.py", WRITES)
    p = cli("run", "writes_output.py", tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    assert np.load(tmp_path / "result.npy").tolist() == [0, 1, 2]
    assert (tmp_path / "frames" / "a" / "f0.txt").read_text() == "frame 0"
    assert "outputs: 2 file(s) copied to" in p.stderr and "WARNING" not in p.stderr
    (tmp_path / "result.npy").write_text("precious")
    p = cli("run", "writes_output.py", "--json", tmp_path=tmp_path)
    result = json.loads(p.stdout)
    assert p.returncode == 0 and result["outputs"] == [] and (tmp_path / "result.npy").read_text() == "precious"
    assert any(n.startswith("WARNING: outputs: 2 file(s) not copied: their names exist") and "result.npy" in n
               and "frames/a/f0.txt" in n for n in result["notes"]), result["notes"]


def test_no_outputs_and_narrowing_globs_name_what_they_leave_behind(tmp_path):
    write(tmp_path / "writes_output.py", WRITES)
    p = cli("run", "writes_output.py", "--no-outputs", tmp_path=tmp_path)
    assert p.returncode == 0 and not (tmp_path / "result.npy").exists()
    assert "WARNING: outputs: 2 file(s) the job left not copied" in " ".join(p.stderr.split()), p.stderr
    p = cli("run", "writes_output.py", "--output", "*.npy", "--json", tmp_path=tmp_path)
    result = json.loads(p.stdout)
    assert result["outputs"] == [str(tmp_path / "result.npy")] and not (tmp_path / "frames").exists()
    assert any("1 file(s) matching no --output pattern" in n and "frames/a/f0.txt" in n for n in result["notes"])
    p = cli("run", "writes_output.py", "--no-outputs", "--output-dir", "x", tmp_path=tmp_path)
    assert p.returncode == 2 and "--no-outputs contradicts --output/--output-dir" in p.stderr


def test_run_kernel_and_sandboxed_copy_into_the_cwd_as_the_cli_does(tmp_path, monkeypatch, supervisor):
    monkeypatch.chdir(tmp_path)
    job = write(tmp_path / "writes_output.py", WRITES)
    result = run_kernel(job, supervisor=supervisor)
    assert result.ok and sorted(result.outputs) == [str(tmp_path / "frames/a/f0.txt"), str(tmp_path / "result.npy")]
    with pytest.warns(FilesWarning, match="their names exist in .*result.npy"):
        assert run_kernel(job, supervisor=supervisor).outputs == []
    with pytest.warns(FilesWarning, match=r"2 file\(s\) the job left not copied"):
        assert run_kernel(job, outputs=[], supervisor=supervisor).outputs == []

    @sandboxed(output_dir="out")
    def simulate(n):
        np.save("state.npy", np.ones(n))
        return n

    with warnings.catch_warnings():
        warnings.simplefilter("error", FilesWarning)
        assert simulate(4) == 4
    assert np.load(tmp_path / "out" / "state.npy").tolist() == [1.0] * 4


def test_inputs_keep_their_layout_directories_and_places_outside_the_cwd(tmp_path, monkeypatch, supervisor):
    work, shared = tmp_path / "work", tmp_path / "shared"
    save(work / "data" / "init.npy", np.arange(4))
    write(work / "data" / "meshes" / "a.obj", "v 1")
    os.symlink("/etc/hostname", work / "data" / "link")
    write(shared / "mesh.obj", "v 2")
    write(shared / "params.json", '{"scale": 3}')
    monkeypatch.chdir(work)
    job = write(work / "job.py", """
        import json, numpy as np
        def main():
            return [float(np.load("data/init.npy").sum()), open("data/meshes/a.obj").read(),
                    open("mesh.obj").read(), json.load(open("config/p.json"))["scale"],
                    open("abs/data/init.npy", "rb").read(6) == b"\\x93NUMPY"]
    """)
    result = supervisor.run(JobSpec(kernel=f"{job}:main", inputs=[
        "data", "../shared/mesh.obj", f"{shared}/params.json=config/p.json", (str(work / "data/init.npy"),
                                                                              "abs/data/init.npy")]))
    assert result.verdict is Verdict.ok, result.reason
    assert result.return_value == [6.0, "v 1", "v 2", 3, True]
    assert any(n.startswith("WARNING: inputs: 1 entries of input directories not copied") and "data/link" in n
               for n in result.notes), result.notes
    spec = JobSpec(kernel="k.py", inputs=[str(work / "data" / "init.npy"), "../work/data/meshes"])
    assert [place for _, place in spec.inputs] == ["data/init.npy", "data/meshes"]


@pytest.mark.parametrize("inputs,fragment", [
    (["data", "data/init.npy"], "would be inside 'data'"),
    (["a.npy=x", "b.npy=x"], "would both be 'x'"),
    (["a.npy=../x"], "not a place inside the job's directory"),
    (["."], "the caller's directory itself"),
])
def test_ambiguous_inputs_are_one_line_errors_naming_the_input(inputs, fragment):
    with pytest.raises(ConfigError, match=fragment) as caught:
        JobSpec(kernel="k.py", inputs=inputs)
    assert "\n" not in str(caught.value)


def test_a_file_named_with_an_equals_sign_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "lr=0.1" / "x.npy", "")
    assert JobSpec(kernel="k.py", inputs=["lr=0.1/x.npy"]).inputs == [("lr=0.1/x.npy", "lr=0.1/x.npy")]
    assert JobSpec(kernel="k.py", inputs=["lr=0.1/x.npy=x.npy"]).inputs == [("lr=0.1/x.npy", "x.npy")]


def test_cli_input_outside_the_cwd_and_the_hint_for_a_file_not_given(tmp_path):
    write(tmp_path / "reads.py", READS)
    save(tmp_path.parent / f"{tmp_path.name}-data" / "init.npy", np.arange(5))
    p = cli("run", "reads.py", "--json", tmp_path=tmp_path)
    reason = json.loads(p.stdout)["reason"]
    assert p.returncode == 1 and reason.startswith("FileNotFoundError: [Errno 2] No such file or directory: "
                                                   "'data/init.npy' — data/init.npy is not in the job's directory: "
                                                   "pass it with --input data/init.npy, or --input PATH=data/init.npy"), reason
    outside = f"../{tmp_path.name}-data/init.npy"
    p = cli("run", "reads.py", "--input", outside, "--json", tmp_path=tmp_path)
    assert "pass it with --input data/init.npy" in json.loads(p.stdout)["reason"]  # placed at init.npy
    p = cli("run", "reads.py", "--input", f"{outside}=data/init.npy", tmp_path=tmp_path)
    assert p.returncode == 0 and p.stdout == "10\n", p.stderr


def test_input_directories_are_bounded(tmp_path):
    from sandbox.job.inputs import stage
    write(tmp_path / "data" / "a.bin", "x" * 600)
    write(tmp_path / "data" / "sub" / "b.bin", "y" * 600)
    (tmp_path / "job").mkdir()
    (tmp_path / "job2").mkdir()
    with pytest.raises(ConfigError, match="inputs: .*data/sub/b.bin: the job's inputs come to more than its disk "
                                          "limit \\(1000 bytes\\)"):
        stage([(str(tmp_path / "data"), "data")], None, str(tmp_path / "job"), None, max_bytes=1000)
    placed, notes = stage([(str(tmp_path / "data"), "d")], None, str(tmp_path / "job2"), None)
    assert placed == {"d/a.bin", "d/sub/b.bin"} and notes == []


HOSTILE = """
    import os
    open("a_result.txt", "w").write("mine")
    os.symlink("/etc/shadow", "shadow")
    os.symlink("/etc", "etc")
    os.mkfifo("pipe.npy")
    with open("huge.bin", "wb") as f:
        f.truncate(1 << 40)
    with open("b_sparse.bin", "wb") as f:
        f.truncate(1 << 30)
        f.seek(1 << 29)
        f.write(b"x")
    os.makedirs("many")
    for i in range(1100):
        open(f"many/{i:04d}", "w").close()
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="a root supervisor runs jobs as a tenant's uid")
def test_a_hostile_jobs_leftovers_cannot_make_the_default_copy_follow_block_or_exceed_caps(tmp_path, monkeypatch):
    """A job of tenant alice leaves symlinks to root's files, a fifo, a 1 TiB sparse file, a 1 GiB
    sparse one and 1100 files; the copy into the caller's cwd (root's, by default) takes regular
    files only, keeps holes, stops at 1000 files, and says what it left."""
    from .test_root_hygiene_files import _tenant_supervisor
    caller = tmp_path / "caller"
    caller.mkdir()
    monkeypatch.chdir(caller)
    with _tenant_supervisor(tmp_path / "state") as sup, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_kernel(write(tmp_path / "hostile.py", HOSTILE), tenant="alice", supervisor=sup,
                            limits={"wall_time": "60s"})
    assert result.ok, result.reason
    assert len(result.outputs) == 1000 and result.outputs[:2] == [str(caller / "a_result.txt"),
                                                                   str(caller / "b_sparse.bin")]
    for root, dirs, files in os.walk(caller):
        for name in dirs + files:
            path = os.path.join(root, name)
            assert not os.path.islink(path) and (os.path.isdir(path) or os.path.isfile(path)), path
    assert not (caller / "shadow").exists() and not (caller / "huge.bin").exists()
    assert (caller / "b_sparse.bin").stat().st_blocks * 512 <= 1 << 20
    messages = [str(w.message) for w in caught if w.category is FilesWarning]
    assert any("3 entries skipped" in m and "etc, pipe.npy, shadow" in m for m in messages), messages
    assert any("103 matching file(s) not copied: the cap is 1000 files" in m for m in messages), messages


@pytest.mark.skipif(os.geteuid() != 0, reason="a root supervisor runs jobs as a tenant's uid")
def test_an_input_directory_is_copied_as_the_tenant_and_nothing_in_it_is_followed(tmp_path):
    """Root copies a directory that a tenant may have planted links and fifos in: the links are
    not followed (root's 0600 file stays out of the job), the fifo does not block, and a file the
    tenant could not read itself refuses the job."""
    from .test_root_hygiene_files import _run, _tenant_supervisor
    secret = tmp_path / "secret"
    secret.write_text("root only")
    secret.chmod(0o600)
    data = tmp_path / "data"
    write(data / "ok.txt", "fine")
    os.symlink(secret, data / "secret")
    os.symlink("/etc", data / "etc")
    os.mkfifo(data / "pipe")
    job = write(tmp_path / "job.py", """
        import os
        def main():
            return [sorted(os.listdir("data")), open("data/ok.txt").read()]
    """)
    with _tenant_supervisor(tmp_path / "state") as sup:
        result = _run(sup, kernel=f"{job}:main", inputs=[str(data)])
        assert result.verdict is Verdict.ok, result.reason
        assert result.return_value == [["ok.txt"], "fine"]
        assert any("3 entries of input directories not copied" in n and "data/etc" in n and "data/pipe" in n
                   and "data/secret" in n for n in result.notes), result.notes
        write(data / "sub" / "private.txt", "root only")  # a file alice cannot read
        (data / "sub" / "private.txt").chmod(0o600)
        refused = _run(sup, kernel=f"{job}:main", inputs=[str(data)])
    assert refused.verdict is Verdict.rejected and "data/sub/private.txt is not readable by the job's uid" in \
        refused.reason, refused.reason


RESEARCHER_UID = 59997  # a user without root (below the tenants' uid_range)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another, unprivileged uid")
def test_a_user_without_root_gets_inputs_in_place_and_the_files_back(tmp_path):
    """`taichi-sandbox run` as a researcher's own uid: the job reads data/init.npy from a directory
    input and leaves its files in the researcher's cwd, owned by them."""
    import subprocess
    import sys

    from .test_isolation import AS_UID
    home = tmp_path / "researcher"
    write(home / "job.py", """
        import numpy as np
        np.save("result.npy", np.load("data/init.npy") * 2)
    """)
    save(home / "data" / "init.npy", np.arange(3))
    for root, dirs, files in os.walk(home):
        for name in [".", *dirs, *files]:
            os.chown(os.path.join(root, name), RESEARCHER_UID, RESEARCHER_UID)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "XDG_STATE_HOME": str(home / "state"),
           "TAICHI_SANDBOX_WARM": "0"}  # no warm server of this uid left after the test (sandbox.warm)
    done = subprocess.run([sys.executable, "-c", AS_UID, str(RESEARCHER_UID), "import runpy; runpy.run_module("
                           "'sandbox', run_name='__main__')", "run", "--local", "job.py", "--input", "data", "--json"],
                          capture_output=True, text=True, cwd=home, env=env, timeout=120)
    result = json.loads(done.stdout)
    assert done.returncode == 0, (result["reason"], done.stderr[-2000:])
    assert np.load(home / "result.npy").tolist() == [0, 2, 4] and (home / "result.npy").stat().st_uid == RESEARCHER_UID
    assert result["outputs"] == [str(home / "result.npy")]
