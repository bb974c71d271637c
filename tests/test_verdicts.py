"""Every verdict provoked for real: real children, real Taichi (arch=cpu), real signals, real psutil."""

from __future__ import annotations

import json
import re

import psutil

from sandbox import JobResult, JobSpec, Limits, Verdict

from .conftest import SUPERVISORS, assert_no_survivors, kernel, kernel_enforces, run, slow_beyond_first


def test_ok_script_runs_as_main_with_output(any_supervisor):
    r = run(any_supervisor, "saxpy.py")
    assert r.verdict is Verdict.ok, r.reason
    assert r.exit_code == 0 and r.signal is None
    assert "saxpy checksum 4.998987e+11" in r.stdout_tail
    assert r.usage.cpu_seconds > 0 and r.usage.peak_rss > 50 << 20
    assert r.ti_init and r.ti_init[0]["effective"]["arch"] in ("x64", "arm64")
    assert r.launcher == any_supervisor.launcher.name


def test_entry_function_returns_json_value(any_supervisor):
    r = run(any_supervisor, "reduction.py:sum_of_squares", kwargs={"n": 1000})
    assert r.verdict is Verdict.ok, r.reason
    assert r.return_value == sum(i * i for i in range(1000))


def test_entry_function_positional_args(supervisor):
    r = run(supervisor, "reduction.py:sum_of_squares", args=[10])
    assert r.return_value == 285


@slow_beyond_first("any_supervisor", SUPERVISORS)
def test_cpu_hog_gets_cpu_time_verdict(any_supervisor):
    r = run(any_supervisor, "cpu_hog.py", cpu_time="2s", grace="1s")
    assert r.verdict is Verdict.cpu_time, r.reason
    first = next(v for v in r.violations if v.action != "warn")
    assert first.resource == "cpu_time" and first.limit == 2.0 and first.observed >= 2.0
    assert 2.0 <= r.usage.cpu_seconds < 6.0
    assert r.usage.wall_seconds < 15
    warned = [v.observed / v.limit for v in r.violations if v.action == "warn"]
    assert len(warned) == 2 and min(warned) >= 0.8


def test_memory_hog_is_killed_at_once(any_supervisor):
    r = run(any_supervisor, "memory_hog.py", memory="400MiB")
    assert r.verdict is Verdict.memory, r.reason
    first = next(v for v in r.violations if v.action != "warn")
    assert first.action == "sigkill" and r.signal == "SIGKILL"
    if kernel_enforces(any_supervisor, "memory"):  # the kernel stops it at the limit: no overshoot
        assert first.detected_by == "cgroup" and first.observed == 400 << 20
        assert r.usage.peak_memory <= 400 << 20 and "OOM-killed" in r.reason
    else:  # overshoot is bounded by what the job allocates in one poll interval (64 MiB per 50 ms here)
        assert first.detected_by == "monitor" and 400 << 20 < first.observed < (400 << 20) + (512 << 20)


@slow_beyond_first("any_supervisor", SUPERVISORS)
def test_sleeper_gets_wall_time_verdict(any_supervisor):
    r = run(any_supervisor, "sleeper.py", wall_time="1.5s")
    assert r.verdict is Verdict.wall_time, r.reason
    assert r.signal == "SIGTERM"
    assert r.usage.cpu_seconds < 1.5
    assert 1.5 <= r.usage.wall_seconds < 5


@slow_beyond_first("any_supervisor", SUPERVISORS)
def test_sigterm_ignorer_is_killed_after_grace(any_supervisor):
    r = run(any_supervisor, "sigterm_ignorer.py", wall_time="2s", grace="1s")
    assert r.verdict is Verdict.wall_time
    assert r.signal == "SIGKILL"
    t = r.termination
    assert t is not None and t.sigterm_at and t.sigkill_at
    assert 0.9 <= t.sigkill_at - t.sigterm_at <= 1.5


@slow_beyond_first("any_supervisor", SUPERVISORS)
def test_spawned_tree_is_killed_including_double_forked_setsid_grandchild(any_supervisor):
    r = any_supervisor.run(JobSpec(kernel=kernel("spawner.py"), limits=Limits(wall_time="4s")))
    pids = [int(p) for p in re.findall(r"pid (\d+)", r.stdout_tail)]
    assert len(pids) == 1 + 3 + 6, r.stdout_tail  # main, 3 children, 6 grandchildren
    assert r.verdict is Verdict.wall_time
    assert r.usage.peak_processes >= 10
    assert_no_survivors(any_supervisor, r.job_id, pids)


def test_process_limit(supervisor):
    r = run(supervisor, "spawner.py", max_processes=4, wall_time="20s")
    assert r.verdict is Verdict.processes, r.reason
    assert next(v for v in r.violations if v.action != "warn").observed > 4


THREE_PROCESSES = """
import os, time
for _ in range(2):
    if os.fork() == 0:
        time.sleep(1.5)
        os._exit(0)
os.wait()
os.wait()
"""


def test_exactly_max_processes_is_allowed(supervisor, tmp_path):
    """max_processes is how many may run: the job itself and two children under max_processes = 3."""
    script = tmp_path / "three.py"
    script.write_text(THREE_PROCESSES)
    r = supervisor.run(JobSpec(kernel=str(script), limits=Limits(max_processes=3, wall_time="20s",
                                                                  poll_interval="50ms")))
    assert r.verdict is Verdict.ok and r.usage.peak_processes == 3, (r.reason, r.usage)


def test_segfault_is_crashed_with_signal_name(any_supervisor):
    r = run(any_supervisor, "segfault.py")
    assert r.verdict is Verdict.crashed
    assert r.signal == "SIGSEGV" and "SIGSEGV" in r.reason


def test_exception_is_error_with_traceback(any_supervisor):
    r = run(any_supervisor, "exception.py")
    assert r.verdict is Verdict.error
    assert r.exit_code == 1
    assert r.error_type == "ValueError" and "sum is 16.0" in r.error_message
    assert "exception.py" in r.traceback and 'raise ValueError' in r.traceback


def test_output_flood_keeps_bounded_tail(supervisor):
    r = run(supervisor, "output_flood.py", max_output="16MiB")
    assert r.verdict is Verdict.output
    assert r.usage.output_bytes > 16 << 20
    assert len(r.stdout_tail) <= 16 * 1024 and r.stdout_tail.strip().endswith("x")
    assert r.stdout_bytes > 16 << 20


def test_address_space_rlimit(supervisor, tmp_path):
    script = tmp_path / "big_alloc.py"
    script.write_text("import taichi as ti\nti.init(arch=ti.cpu)\nimport numpy as np\n"
                      "a = np.empty(8 << 30, dtype=np.uint8)\n")
    r = supervisor.run(JobSpec(kernel=str(script), limits=Limits(memory="1GiB")))
    assert r.verdict is Verdict.memory, r.reason  # the RLIMIT_AS that address_space "auto" derives from memory
    v = next(v for v in r.violations if v.action != "warn")
    assert v.detected_by == "rlimit" and v.limit == 1 << 30 and v.observed > r.rlimits["RLIMIT_AS"]
    assert r.rlimits["RLIMIT_AS"] == (2 << 30) + (1 << 30)
    assert "refused an allocation of 8.00 GiB" in r.reason


def test_rlimit_cpu_is_applied_with_hard_margin(supervisor, tmp_path):
    script = tmp_path / "show_limits.py"
    script.write_text("import resource, json\n"
                      "print(json.dumps([resource.getrlimit(r) for r in (resource.RLIMIT_CPU, "
                      "resource.RLIMIT_CORE, resource.RLIMIT_NOFILE, resource.RLIMIT_FSIZE)]))\n")
    r = supervisor.run(JobSpec(kernel=str(script), limits=Limits(cpu_time="3.5s", max_open_files=100,
                                                                 max_file_size="10MiB", grace="1s")))
    assert r.verdict is Verdict.ok, r.reason
    cpu, core, nofile, fsize = json.loads(r.stdout_tail)
    assert cpu == [4, 6] and core == [0, 0] and nofile == [100, 100] and fsize == [10 << 20, 10 << 20]


def test_result_round_trips_through_json(supervisor):
    r = run(supervisor, "cpu_hog.py", cpu_time="1s", grace="0.5s")
    data = json.loads(r.model_dump_json())
    assert data["verdict"] == "cpu_time"
    again = JobResult.model_validate_json(r.model_dump_json())
    assert again == r and again.verdict is Verdict.cpu_time


def test_timeline_is_bounded_and_ordered(supervisor):
    r = run(supervisor, "sleeper.py", wall_time="2s", poll_interval="10ms")
    ts = [s.t for s in r.timeline]
    assert 20 <= len(ts) <= 600 and ts == sorted(ts)


def test_missing_kernel_file_is_rejected_with_reason(supervisor):
    r = supervisor.run(JobSpec(kernel="kernels/does_not_exist.py"))
    assert r.verdict is Verdict.rejected
    assert r.reason == "kernel file not found: kernels/does_not_exist.py"


def test_unknown_profile_is_rejected(supervisor):
    r = supervisor.run(JobSpec(kernel=kernel("saxpy.py"), profile="nope"))
    assert r.verdict is Verdict.rejected and "profile: no such profile (got 'nope'" in r.reason


def test_syntax_error_is_error_with_one_line_reason(supervisor, tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import taichi as ti\ndef f(:\n  pass\n")
    r = supervisor.run(JobSpec(kernel=str(script)))
    assert r.verdict is Verdict.error
    assert r.error_type == "SyntaxError" and "\n" not in r.reason


def test_fork_server_keeps_no_children_after_jobs(supervisor):
    run(supervisor, "spawner.py", wall_time="2s")
    server = psutil.Process(supervisor.launcher.server_pid)
    assert server.children(recursive=True) == []


def test_rlimit_cpu_ends_a_kernel_the_monitor_did_not_catch(supervisor):
    # An hour-long poll leaves the job to the kernel: SIGXCPU at 1 s is pending while the kernel holds the
    # GIL, so the hard limit's SIGKILL ends it at 1 + 2 s of CPU.
    r = run(supervisor, "cpu_hog.py", cpu_time="1s", grace="0.5s", poll_interval="1h")
    assert r.verdict is Verdict.cpu_time, r.reason
    v = next(v for v in r.violations if v.action != "warn")
    assert v.detected_by == "rlimit" and r.signal == "SIGKILL"
    assert 2.5 <= r.usage.cpu_seconds < 5
