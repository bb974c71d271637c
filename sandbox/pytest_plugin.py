"""pytest plugin (entry point `pytest11`): a test marked `@pytest.mark.sandbox(memory="1GiB",
cpu_time="10s")` runs in the sandbox and behaves as it would under pytest: its fixture values
go along (sandbox.testing.crossing; `tmp_path` is bound into the job at the same path), a failing
assert says what it compared, skip/xfail/fail are pytest outcomes, the job's output is in pytest's
captured output, and a broken limit fails the test with the verdict (sandbox.testing.outcome).
Keywords are Limits fields, plus `arch`, `profile`, `tenant` and `env` (sandbox.testing.marker).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sandbox(**limits): run this test in taichi-sandbox under these limits "
                                       "(arch=, profile=, tenant=, env= too)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A mistake in a sandbox marker stops the session before any test runs (one line)."""
    marked = [(item, marker) for item in items if (marker := item.get_closest_marker("sandbox")) is not None]
    if not marked:
        return
    from .testing.marker import problem  # imported only where a test uses the sandbox

    for item, marker in marked:
        why = problem(marker)
        if why is not None:
            raise pytest.UsageError(f"{item.nodeid}: {why}")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):
    marker = pyfuncitem.get_closest_marker("sandbox")
    if marker is None:
        return None
    from .api import run_kernel
    from .core.limits import ConfigError
    from .testing import crossing, job, outcome
    from .testing.marker import job_options

    limits, spec = job_options(marker)
    try:
        values, binds = crossing.fixtures(pyfuncitem)
        test = crossing.ship_test(pyfuncitem, values)
        result = run_kernel(job.run_test, args=[test, crossing.rewritten(pyfuncitem)], limits=limits, binds=binds,
                            labels={"pytest": pyfuncitem.nodeid[-200:]}, **spec)
    except (ConfigError, crossing.CrossingError) as err:
        refused = str(err)
    else:
        refused = None
    if refused is not None:
        pytest.fail(refused, pytrace=False)  # outside the except: no "During handling of the above exception"
    outcome.raise_outcome(result, pyfuncitem)
    return True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A test that failed in its job is reported with the job's traceback (outcome.JobFailure)."""
    report = (yield).get_result()
    longrepr = getattr(call.excinfo.value, "sandbox_longrepr", None) if call.excinfo is not None else None
    if longrepr is not None:
        report.longrepr = longrepr
