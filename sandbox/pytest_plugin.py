"""pytest plugin (entry point `pytest11`): `@pytest.mark.sandbox(memory="1GiB", cpu_time="10s")` runs
that test in the sandbox, with its fixture values shipped along (sandbox.core.shipping), and fails it with
the verdict, the violations and the job's traceback. Keywords are Limits fields, plus `arch`,
`profile` and `tenant`.
"""

from __future__ import annotations

import functools

import pytest

SPEC_KEYS = ("arch", "profile", "tenant")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "sandbox(**limits): run this test in taichi-sandbox under these limits "
                                       "(arch=, profile=, tenant= too)")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function):
    marker = pyfuncitem.get_closest_marker("sandbox")
    if marker is None:
        return None
    from . import ConfigError, run_kernel

    if marker.args:
        raise pytest.UsageError(f"{pyfuncitem.nodeid}: @pytest.mark.sandbox takes keywords only (limits, arch, "
                                "profile, tenant)")
    spec = {k: v for k, v in marker.kwargs.items() if k in SPEC_KEYS}
    limits = {k: v for k, v in marker.kwargs.items() if k not in SPEC_KEYS}
    fixtures = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    try:
        result = run_kernel(functools.partial(pyfuncitem.obj, **fixtures), limits=limits, **spec)
    except ConfigError as err:
        pytest.fail(f"sandbox: {err}", pytrace=False)
    if not result.ok:
        lines = [f"sandbox verdict {result.verdict.value}: {result.reason}"]
        lines += [f"  violation: {v.resource} {v.observed:g} > {v.limit:g} ({v.detected_by}, {v.action})"
                  for v in result.violations if v.action != "warn"]
        if result.traceback:
            lines += ["job traceback:", result.traceback.rstrip()]
        pytest.fail("\n".join(lines), pytrace=False)
    return True
