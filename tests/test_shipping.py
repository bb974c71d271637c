"""Callables in: functions, closures, lambdas and `__main__` code shipped to real jobs (sandbox.core.shipping),
kernels compiled from shipped source, numpy arguments, and no nested sandboxes."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import taichi as ti

from sandbox import ConfigError, JobSpec, Limits, Verdict
from sandbox.node.executor import Capacity, SandboxExecutor
from sandbox.core.limits import GiB

from .conftest import ROOT, assert_no_survivors

SIMULATION = '''
import json, os, sys
import taichi as ti
from sandbox import run_kernel

GAIN = 3.0


def simulate(n, steps):
    x = ti.field(ti.f32, shape=n)

    @ti.kernel
    def step():
        for i in x:
            x[i] = x[i] * 0.5 + GAIN * i

    for _ in range(steps):
        step()
    return x.to_numpy()


def report(r):
    value = r.return_value
    print(json.dumps({"verdict": r.verdict.value, "reason": r.reason, "dtype": str(getattr(value, "dtype", "")),
                      "value": value.tolist() if value is not None else None}))
'''
EXPECTED = [0.0, 4.5, 9.0, 13.5]  # two steps: 3i, then 1.5i + 3i


def run_script(tmp_path, args: list[str], stdin=None, timeout: float = 180) -> dict:
    """Run a Python script as a user would (default supervisor, the repository's limits.toml); its
    last stdout line is its JSON report."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TAICHI_SANDBOX_LIMITS": str(ROOT / "limits.toml")}
    p = subprocess.run([sys.executable, *args], stdin=stdin, capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=timeout)
    assert p.returncode == 0 and p.stdout.strip(), p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_main_function_with_inner_kernel_from_a_script_the_job_cannot_read(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    script = private / "sim.py"
    script.write_text(SIMULATION + '''
if __name__ == "__main__":
    report(run_kernel(simulate, args=[4], kwargs={"steps": 2}))
''')
    script.chmod(0o600)  # a root supervisor's job (a tenant uid) cannot read it: Taichi compiles the shipped source
    out = run_script(tmp_path, [str(script)])
    assert out["verdict"] == "ok", out["reason"]
    assert out["value"] == EXPECTED and out["dtype"] == "float32"


def test_main_function_by_name_from_stdin(tmp_path):
    script = tmp_path / "sim.py"
    script.write_text(SIMULATION + '\nreport(run_kernel("__main__:simulate", args=[4], kwargs={"steps": 2}))\n')
    with open(script) as stdin:
        out = run_script(tmp_path, ["-"], stdin=stdin)
    assert out["verdict"] == "ok", out["reason"]
    assert out["value"] == EXPECTED


def test_function_defined_in_a_notebook_cell(tmp_path):
    cell = tmp_path / "cell.txt"
    cell.write_text(SIMULATION + "\nreport(run_kernel(simulate, args=[4], kwargs={'steps': 2}))\n")
    driver = tmp_path / "kernel_driver.py"  # what IPython does with a cell: its source lives only in linecache
    driver.write_text('''
import linecache, sys
source = open(sys.argv[1]).read()
name = "/tmp/ipykernel_4242/3141592653.py"
linecache.cache[name] = (len(source), None, source.splitlines(True), name)
exec(compile(source, name, "exec"), vars(sys.modules["__main__"]))
''')
    out = run_script(tmp_path, [str(driver), str(cell)])
    assert out["verdict"] == "ok", out["reason"]
    assert out["value"] == EXPECTED


def test_module_level_kernel_or_field_is_refused_with_what_to_do(tmp_path):
    script = tmp_path / "top.py"
    script.write_text('''
import json
import taichi as ti
from sandbox import ConfigError, run_kernel

ti.init(arch=ti.cpu)
x = ti.field(ti.f32, shape=4)


@ti.kernel
def fill():
    for i in x:
        x[i] = 1


def uses_kernel():
    fill()


def uses_field():
    return x.to_numpy()


errors = []
for job in (uses_kernel, uses_field):
    try:
        run_kernel(job)
    except ConfigError as err:
        errors.append(str(err))
print(json.dumps(errors))
''')
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "TAICHI_SANDBOX_LIMITS": str(ROOT / "limits.toml")}
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    kernel_error, field_error = json.loads(p.stdout.strip().splitlines()[-1])
    assert "Taichi kernel 'fill'" in kernel_error and "define kernels inside the job function" in kernel_error
    assert "ScalarField" in field_error and "inside the job function" in field_error
    assert "\n" not in kernel_error + field_error


def fill_field(n: int) -> np.ndarray:
    """A job function of an importable module: shipped by reference, imported in the child."""
    x = ti.field(ti.i32, shape=n)

    @ti.kernel
    def fill():
        for i in x:
            x[i] = i * i

    fill()
    return x.to_numpy()


def test_module_function_closure_and_lambda(any_supervisor):
    data = np.arange(5, dtype=np.float64)
    offset = 0.5
    jobs = {
        "module function": (JobSpec(kernel=fill_field, args=[4]), [0, 1, 4, 9]),
        "closure": (JobSpec(kernel=lambda k: data * k + offset, args=[2]), [0.5, 2.5, 4.5, 6.5, 8.5]),
        "partial": (JobSpec(kernel=functools.partial(np.full, 3), kwargs={"fill_value": 7}), [7, 7, 7]),
    }
    for name, (spec, expected) in jobs.items():
        r = any_supervisor.run(spec)
        assert r.verdict is Verdict.ok, (name, r.reason, r.traceback)
        assert r.return_value.tolist() == expected, name
        assert_no_survivors(any_supervisor, r.job_id)
    assert jobs["module function"][0].kernel == "tests.test_shipping:fill_field"


def test_numpy_arguments_for_a_file_function(supervisor, tmp_path):
    script = tmp_path / "scale.py"
    script.write_text("def scale(a, by, pair):\n    return a * by, pair\n")
    a = np.arange(6, dtype=np.int16).reshape(2, 3)
    r = supervisor.run(JobSpec(kernel=f"{script}:scale", kwargs={"a": a, "by": 2, "pair": (np.float32(1.5), np.nan)}))
    assert r.verdict is Verdict.ok, r.reason
    doubled, pair = r.return_value
    assert doubled.dtype == np.int16 and doubled.shape == (2, 3) and doubled.tolist() == (a * 2).tolist()
    assert pair[0] == np.float32(1.5) and isinstance(pair[0], np.float32) and np.isnan(pair[1])


def test_unsupported_argument_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"object is not supported .* \(at \[0\]\)") as err:
        JobSpec(kernel="k.py:f", args=[object()])
    assert "\n" not in str(err.value)


def test_a_script_without_main_guard_cannot_nest_sandboxes(supervisor, tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(f"from sandbox import run_kernel\n\n\ndef f():\n    return 1\n\n\n"
                      f"print(run_kernel({str(script)!r} + ':f').verdict)\n")
    r = supervisor.run(JobSpec(kernel=f"{script}:f", limits=Limits(wall_time="30s")))
    assert r.verdict is Verdict.error, r.reason
    assert "cannot be started inside a sandboxed job" in r.reason and "__main__" in r.reason


def test_executor_submit_and_map_take_callables(supervisor):
    table = np.linspace(0, 1, 3, dtype=np.float32)
    with SandboxExecutor(max_concurrent=2, capacity=Capacity(2, 64 * GiB, None), supervisor=supervisor) as ex:
        single = ex.submit(lambda: table * 2).result(120)
        mapped = list(ex.map([functools.partial(pow, 2, 10), JobSpec(kernel=np.sum, args=[table])]))
    assert single.ok, single.reason
    assert single.return_value.dtype == np.float32 and single.return_value.tolist() == [0.0, 1.0, 2.0]
    assert [r.return_value for r in mapped] == [1024, 1.5]
