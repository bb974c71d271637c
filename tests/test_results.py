"""Arrays out: return values through result files (sandbox.job.results), the max_result limit, and result
directories written by a hostile job."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import taichi as ti

from sandbox import JobResult, JobSpec, Limits, Policy, Verdict
from sandbox.core import values
from sandbox.core.limits import MiB

from .conftest import ROOT

STRUCTURED = np.dtype([("x", "<f4"), ("n", "<i4")])


def many_arrays() -> dict:
    """Arrays of several dtypes and shapes, nested in dicts, lists and tuples, and a Taichi field."""
    x = ti.field(ti.f64, shape=(3, 2))

    @ti.kernel
    def fill():
        for i, j in x:
            x[i, j] = i + j / 10

    fill()
    return {
        "f32": np.full((3, 4), 1.5, np.float32), "i8": np.arange(24, dtype=np.int8).reshape(2, 3, 4),
        "bool": np.array([True, False]), "c128": np.array([1 + 2j]), "zero_d": np.array(7, np.uint16),
        "empty": np.zeros((0, 3)), "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "structured": np.array([(1.5, 2)], STRUCTURED), "scalar": np.float32(2.5),
        "nested": [(np.arange(2), {"deep": [np.int64(3)]})], "taichi": x.to_numpy(), 5: "int key",
        "nonfinite": [math.nan, math.inf, -math.inf, np.array([np.nan, -np.inf])],
    }


def test_arrays_keep_dtype_and_shape_nested_anywhere(any_supervisor):
    r = any_supervisor.run(JobSpec(kernel=many_arrays))
    assert r.verdict is Verdict.ok, (r.reason, r.traceback)
    v = r.return_value
    for key, dtype, shape in [("f32", np.float32, (3, 4)), ("i8", np.int8, (2, 3, 4)), ("bool", np.bool_, (2,)),
                              ("c128", np.complex128, (1,)), ("zero_d", np.uint16, ()), ("empty", np.float64, (0, 3)),
                              ("fortran", np.float64, (2, 3)), ("structured", STRUCTURED, (1,)),
                              ("taichi", np.float64, (3, 2))]:
        assert isinstance(v[key], np.ndarray) and v[key].dtype == dtype and v[key].shape == shape, key
    assert v["i8"].tolist() == np.arange(24).reshape(2, 3, 4).tolist() and v["c128"][0] == 1 + 2j
    assert v["fortran"].tolist() == [[0, 1, 2], [3, 4, 5]] and v["structured"][0]["n"] == 2
    assert v["taichi"][2, 1] == pytest.approx(2.1)
    assert isinstance(v["scalar"], np.float32) and v["scalar"] == 2.5
    (pair,) = v["nested"]
    assert isinstance(pair, tuple) and pair[0].tolist() == [0, 1] and isinstance(pair[1]["deep"][0], np.int64)
    assert v[5] == "int key"
    nan, inf, minus_inf, arr = v["nonfinite"]
    assert math.isnan(nan) and inf == math.inf and minus_inf == -math.inf
    assert np.isnan(arr[0]) and arr[1] == -np.inf


def test_result_survives_json_and_run_json_keeps_arrays(supervisor, tmp_path):
    r = supervisor.run(JobSpec(kernel=many_arrays))
    again = JobResult.model_validate_json(r.model_dump_json())
    assert again.return_value["structured"].dtype == STRUCTURED and isinstance(again.return_value["nested"][0], tuple)
    assert math.isnan(again.return_value["nonfinite"][0]) and isinstance(again.return_value["scalar"], np.float32)
    script = tmp_path / "field.py"
    script.write_text("import numpy as np\n\n\ndef final():\n    return {'u': np.ones((256, 256), np.float32), "
                      "'err': float('nan')}\n")
    p = _cli("run", str(script), "--entry", "final", "--json", tmp_path=tmp_path)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    value = JobResult.model_validate_json(p.stdout).return_value
    assert value["u"].dtype == np.float32 and value["u"].shape == (256, 256) and math.isnan(value["err"])


def big_field(n: int):
    return np.ones((n, n), np.float32)


def test_256x256_float32_and_max_result(any_supervisor):
    r = any_supervisor.run(JobSpec(kernel=big_field, args=[256]))
    assert r.verdict is Verdict.ok, r.reason
    assert r.return_value.shape == (256, 256) and r.return_value.dtype == np.float32
    r = any_supervisor.run(JobSpec(kernel=big_field, args=[1024], limits=Limits(max_result="1MiB")))
    assert r.verdict is Verdict.result and r.exit_status == 114, r.reason
    assert "result limit 1.0 MiB exceeded" in r.reason and "max_result" in r.reason
    (v,) = [v for v in r.violations if v.action != "warn"]
    assert v.resource == "result" and v.detected_by == "child" and v.observed >= 4 * MiB and r.return_value is None


def test_max_result_default_is_documented():
    assert Limits().max_result == 64 * MiB
    assert Policy.load(ROOT / "limits.toml").defaults.max_result == 64 * MiB
    assert "`max_result`" in (ROOT / "README.md").read_text()


def deep(levels: int):
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


def test_deep_huge_and_unsupported_values_are_clean_verdicts(supervisor, tmp_path):
    r = supervisor.run(JobSpec(kernel=deep, args=[900]))
    assert r.verdict is Verdict.error and "nested deeper than 100 levels" in r.reason, r.reason
    r = supervisor.run(JobSpec(kernel=deep, args=[99]))
    assert r.verdict is Verdict.ok and JobResult.model_validate_json(r.model_dump_json()).return_value == deep(99)
    r = supervisor.run(JobSpec(kernel=lambda: ["x" * 1000] * 5000, limits=Limits(max_result="1MiB")))
    assert r.verdict is Verdict.result, r.reason
    r = supervisor.run(JobSpec(kernel=lambda: {"handle": open(os.devnull)}))
    assert r.verdict is Verdict.error, r.reason
    assert "TextIOWrapper is not supported" in r.reason and "(at ['handle'])" in r.reason
    script = tmp_path / "deep.py"
    script.write_text("def deep():\n    v = []\n    for _ in range(900):\n        v = [v]\n    return v\n")
    p = _cli("run", str(script), "--entry", "deep", "--json", tmp_path=tmp_path)
    assert json.loads(p.stdout)["verdict"] == "error" and "Traceback" not in p.stderr, p.stderr[-2000:]


def _cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path), "TAICHI_SANDBOX_LIMITS": str(ROOT / "limits.toml")}
    return subprocess.run([sys.executable, "-m", "sandbox", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)


# --- a hostile job writes its own result directory -------------------------------------------------------------

def hostile(how: str):
    """Replace the child's result writer (the job runs in the child's process) with one that leaves
    `how` in the result directory and claims the bytes it wrote (less when it lies about size)."""
    import sandbox.job.results

    def write(value, workdir, max_result):
        result = sandbox.job.results.directory(workdir)
        decoy = os.path.join(os.path.dirname(workdir), "decoy")
        os.makedirs(decoy)
        with open(os.path.join(decoy, "value.json"), "w") as f:
            f.write("[1]")
        if how == "dir symlink":
            os.symlink(decoy, result)
            return 10
        os.makedirs(result)
        value_json = os.path.join(result, "value.json")
        if how == "file symlink":
            os.symlink("/etc/hostname", value_json)
        elif how == "fifo":
            os.mkfifo(value_json)
        elif how == "hard link":
            os.link(os.path.join(decoy, "value.json"), value_json)
        elif how == "path reference":
            with open(value_json, "w") as f:
                f.write('{"__ndarray__": "../decoy/value.json"}')
        elif how == "understate":
            with open(value_json, "w") as f:
                f.write("[1, 2, 3]")
        elif how == "deep json":
            with open(value_json, "w") as f:
                f.write("[" * 100_000 + "]" * 100_000)
        elif how in ("forged header", "object dtype", "lie about size"):
            with open(value_json, "w") as f:
                f.write('{"__ndarray__": 0}')
            with open(os.path.join(result, "0.npy"), "wb") as f:
                if how == "forged header":
                    np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False,
                                                             "shape": (10**12,)})
                    f.write(b"\0" * 64)
                elif how == "object dtype":
                    np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)
                else:
                    np.save(f, np.ones(2 * MiB, np.uint8))
        if how in ("lie about size", "understate"):  # claims only its value.json, or less
            return 18 if how == "lie about size" else 3
        return sum(os.lstat(os.path.join(result, name)).st_size for name in os.listdir(result))

    sandbox.job.results.write = write
    return "anything"


@pytest.mark.parametrize("how,problem", [
    ("dir symlink", "symbolic links|Not a directory"), ("file symlink", "symbolic links"),
    ("fifo", "not a regular file"), ("hard link", "one link"), ("path reference", "not a file number"),
    ("deep json", "RecursionError"), ("forged header", "does not match"), ("object dtype", "object dtype"),
    ("understate", "more than the 3 bytes the job reported"),
])
def test_hostile_result_files_give_a_clean_error(supervisor, how, problem):
    r = supervisor.run(JobSpec(kernel=hostile, args=[how], limits=Limits(wall_time="30s")))
    assert r.verdict is Verdict.error and r.error_type == "ResultError", (r.verdict, r.reason)
    assert r.reason.startswith("ResultError: unusable result files") and r.return_value is None
    assert re.search(problem, r.reason), r.reason


def test_supervisor_counts_result_bytes_itself(supervisor):
    r = supervisor.run(JobSpec(kernel=hostile, args=["lie about size"], limits=Limits(max_result="1MiB")))
    assert r.verdict is Verdict.result, r.reason
    (v,) = [v for v in r.violations if v.action != "warn"]
    assert v.detected_by == "supervisor" and v.observed > MiB


@pytest.mark.parametrize("wrap", [lambda v: [v], lambda v: (v,), lambda v: {"k": v}, lambda v: {1: v}])
def test_deepest_encodable_values_survive_json(wrap):
    value = np.zeros(2)
    while True:
        try:
            values.encode(wrap(value), lambda a: 0)
        except values.UnsupportedValue:
            break
        value = wrap(value)
    again = JobResult.model_validate_json(JobResult(job_id="j", kernel="k", arch="cpu", verdict=Verdict.ok,
                                                    return_value=value).model_dump_json()).return_value
    assert repr(again) == repr(value)
