"""Files in and out of a job: inputs placed read-only in its dir, outputs copied out safely."""

from __future__ import annotations

import glob
import json
import os
import textwrap

import numpy as np
import pytest

from sandbox import ConfigError, JobSpec, Limits, Verdict

from .test_cli import cli


def script(tmp_path, body: str, name: str = "job.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def run_spec(sup, **fields):
    result = sup.run(JobSpec(limits=Limits(memory="1GiB", wall_time="60s"), **fields))
    assert not glob.glob(f"/tmp/tsbx-{result.job_id}-*"), "the job's dir was not removed"
    return result


def test_outputs_are_copied_to_the_destination_and_listed(tmp_path, supervisor):
    job = script(tmp_path, """
        import os
        os.makedirs("meshes")
        for i in range(3):
            with open(f"meshes/frame_{i}.ply", "w") as f:
                f.write(f"ply {i}\\n")
        open("scratch.tmp", "w").write("not wanted")
    """)
    out = tmp_path / "out"
    result = run_spec(supervisor, kernel=job, outputs=["*.ply"], output_dir=str(out))
    assert result.verdict is Verdict.ok, result.reason
    expected = [str(out / "meshes" / f"frame_{i}.ply") for i in range(3)]
    assert result.outputs == expected
    assert [open(p).read() for p in expected] == [f"ply {i}\n" for i in range(3)]
    assert not (out / "scratch.tmp").exists()


def test_hostile_outputs_copy_only_the_jobs_regular_files(tmp_path, supervisor, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = script(tmp_path, """
        import os
        open("result.txt", "w").write("mine")
        os.symlink("/etc/shadow", "shadow")
        os.symlink("/etc", "etc")
        os.mkfifo("fifo")
        os.makedirs("deep/er")
        os.symlink("/etc/passwd", "deep/er/passwd")
        for target in ("/etc/shadow", "init.txt"):
            try:
                os.link(target, "hard-" + os.path.basename(target))
            except OSError:
                pass
    """)
    (tmp_path / "init.txt").write_text("input")
    out = tmp_path / "out"
    result = run_spec(supervisor, kernel=job, inputs=["init.txt"], outputs=["*"], output_dir=str(out))
    assert result.verdict is Verdict.ok, result.reason
    copied = sorted(os.path.relpath(p, out) for p in result.outputs)
    tenant_uid = os.geteuid() == 0 and supervisor.namespaces_unavailable() is None
    assert copied == ["result.txt"] or (not tenant_uid and copied == ["hard-init.txt", "result.txt"])
    for root, dirs, files in os.walk(out):
        for name in dirs + files:
            assert not os.path.islink(os.path.join(root, name))
    assert not (out / "shadow").exists() and not (out / "etc").exists() and not (out / "init.txt").exists()
    note = next(n for n in result.notes if "entries skipped: not regular files" in n)
    assert "shadow" in note and "fifo" in note and "deep/er/passwd" in note and "init.txt" not in note


def test_outputs_beyond_the_cap_are_named_in_a_note(tmp_path, supervisor):
    job = script(tmp_path, """
        for i in range(1005):
            open(f"f{i:04d}.txt", "w").write("x")
    """)
    result = run_spec(supervisor, kernel=job, outputs=["*.txt"], output_dir=str(tmp_path / "out"))
    assert result.verdict is Verdict.ok and len(result.outputs) == 1000
    assert any("5 matching file(s) not copied: the cap is 1000 files" in n for n in result.notes)


def test_byte_cap_skips_what_does_not_fit(tmp_path):
    from sandbox.job.files import collect
    work = tmp_path / "work"
    work.mkdir()
    (work / "big").write_bytes(b"x" * 100)
    (work / "small").write_bytes(b"y" * 10)
    copied, notes = collect(["*"], str(work), str(tmp_path / "out"), None, max_bytes=50)
    assert copied == [str(tmp_path / "out" / "small")] and not (tmp_path / "out" / "big").exists()
    assert "1 matching file(s) not copied" in notes[0]


def test_inputs_are_read_only_files_found_by_relative_path(tmp_path, supervisor, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "init.npy", np.arange(6.0))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "params.json").write_text('{"scale": 2}')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "mesh.obj").write_text("v 0 0 0")
    job = script(tmp_path, """
        import json, numpy as np
        def main():
            x = np.load("init.npy")
            scale = json.load(open("data/params.json"))["scale"]
            try:
                open("init.npy", "wb").write(b"changed")
                writable = True
            except PermissionError:
                writable = False
            return {"sum": float(x.sum()) * scale, "mesh": open("elsewhere/mesh.obj").read(), "writable": writable}
    """)
    result = run_spec(supervisor, kernel=f"{job}:main",
                      inputs=["init.npy", "data/params.json", str(elsewhere / "mesh.obj")])
    assert result.verdict is Verdict.ok, result.reason + (result.traceback or "")
    assert result.return_value["sum"] == 30.0 and result.return_value["mesh"] == "v 0 0 0"
    if supervisor.namespaces_unavailable() is None and os.geteuid() == 0:
        assert result.return_value["writable"] is False
    assert np.load(tmp_path / "init.npy").tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("inputs,fragment", [
    (["nope.npy"], "inputs: nope.npy: not found"),
    (["../x.npy"], "inputs: ../x.npy: not found"),
    (["a/x.npy", "b/../a/x.npy"], "would both be 'a/x.npy'"),
])
def test_bad_inputs_are_a_clear_rejection(tmp_path, supervisor, monkeypatch, inputs, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.npy").write_text("x")
    job = script(tmp_path, "print(1)\n")
    try:
        result = supervisor.run(JobSpec(kernel=job, inputs=inputs))
    except ValueError as err:  # invalid at construction: a one-line ConfigError
        assert fragment in str(err) and "\n" not in str(err)
        return
    assert result.verdict is Verdict.rejected and fragment in result.reason


@pytest.mark.skipif(os.geteuid() != 0, reason="jobs run as a tenant uid only under a root supervisor")
def test_input_the_tenant_cannot_read_is_rejected(tmp_path, supervisor):
    if supervisor.namespaces_unavailable() is not None:
        pytest.skip(supervisor.namespaces_unavailable())
    secret = tmp_path / "secret.txt"
    secret.write_text("root only")
    secret.chmod(0o600)
    result = supervisor.run(JobSpec(kernel=script(tmp_path, "print(1)\n"), inputs=[str(secret)]))
    assert result.verdict is Verdict.rejected and "not readable by the job's uid" in result.reason


def test_outputs_without_a_destination_are_a_config_error():
    with pytest.raises(ValueError, match="outputs need an output_dir"):
        JobSpec(kernel="k.py", outputs=["*.ply"])


def test_a_script_imports_the_modules_beside_it_as_python_does(tmp_path, supervisor):
    (tmp_path / "helper.py").write_text("def double(x):\n    return 2 * x\n")
    result = run_spec(supervisor, kernel=script(tmp_path, "import helper\nprint(helper.double(21))\n"))
    assert result.verdict is Verdict.ok and result.stdout_tail == "42\n", result.reason


def test_an_input_sent_as_a_descriptor_keeps_its_holes(tmp_path):
    """A client of the node service could send a memfd of 256 MiB that uses no memory: written out
    densely by the service, it would cost the node 256 MiB of disk."""
    from sandbox.job.inputs import stage
    fd = os.memfd_create("sparse")
    os.ftruncate(fd, 256 << 20)
    os.pwrite(fd, b"data", 100 << 20)
    stage([("big.bin", "big.bin")], None, str(tmp_path), None, (fd,))
    copy = tmp_path / "big.bin"
    assert copy.stat().st_size == 256 << 20 and copy.stat().st_blocks * 512 <= 1 << 20
    with open(copy, "rb") as f:
        f.seek(100 << 20)
        assert f.read(4) == b"data"


def test_inputs_sent_as_descriptors_that_grew_past_the_jobs_budget_are_refused(tmp_path):
    """The service checks a job's inputs at admission; a client can grow them before the job starts."""
    from sandbox.job.inputs import MAX_INPUT_BYTES, stage
    fds = [os.memfd_create(name) for name in ("a", "b")]
    for fd in fds:
        os.ftruncate(fd, MAX_INPUT_BYTES // 2 + 1)  # no memory: holes
    with pytest.raises(ConfigError, match="b.bin: grew past the job's 4294967296 bytes of inputs"):
        stage([("a.bin", "a.bin"), ("b.bin", "b.bin")], None, str(tmp_path), None, tuple(fds))


def test_cli_input_and_output_dir(tmp_path):
    (tmp_path / "init.txt").write_text("7")
    job = script(tmp_path, """
        n = int(open("init.txt").read())
        for i in range(n):
            open(f"mesh_{i}.ply", "w").write(str(i))
    """)
    p = cli("run", job, "--input", "init.txt", "--output-dir", "out", "--json", tmp_path=tmp_path)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert len(result["outputs"]) == 7 and sorted(os.listdir(tmp_path / "out")) == [f"mesh_{i}.ply" for i in range(7)]
    p = cli("run", job, "--input", "init.txt", "--output-dir", "out2", "--output", "mesh_1*", tmp_path=tmp_path)
    assert p.returncode == 0 and os.listdir(tmp_path / "out2") == ["mesh_1.ply"]
    assert "outputs: 1 file(s) copied to" in p.stderr
