"""JobResult in a notebook: the rich and HTML reprs show verdict, usage against limits, violations."""

from __future__ import annotations

from rich.console import Console

from sandbox import JobSpec

from .conftest import run


def rendered(result) -> str:
    console = Console(record=True, width=160)
    console.print(result)
    return console.export_text()


def test_rich_and_html_reprs_of_a_limit_breach(supervisor):
    result = run(supervisor, "cpu_hog.py", cpu_time="1s", memory="1GiB")
    text = rendered(result)
    assert "verdict: cpu_time" in text and "violations" in text and "1s" in text and "1.0 GiB" in text
    page = result._repr_html_()
    assert "cpu_time</b>" in page and "<caption style='text-align:left'>violations</caption>" in page
    assert "<td>cpu time</td>" in page and "<td>1s</td>" in page


def test_html_repr_escapes_what_the_job_wrote(supervisor, tmp_path):
    job = tmp_path / "hostile.py"
    job.write_text("import sys\nsys.stderr.write('<script>alert(1)</script>')\nraise SystemExit(1)\n")
    result = supervisor.run(JobSpec(kernel=str(job)))
    page = result._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "verdict: error" in rendered(result)
