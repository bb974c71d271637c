"""The shipped dashboard (deploy/grafana) and alert rules (deploy/prometheus) against a real service:
every metric name their PromQL uses is in a scrape of a `taichi-sandbox serve` process over HTTP on
127.0.0.1, and promtool (when installed: scripts/install-promtool.sh) accepts the rules, their unit
tests, the dashboard's expressions and the scrape itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sandbox.node.metrics import Metrics

from .test_service import SLEEP, Node, free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "taichi-sandbox.json"
RULES = ROOT / "deploy" / "prometheus" / "taichi-sandbox-rules.yml"
FROM_PROMETHEUS = {"up"}  # series Prometheus makes itself, not the service
PROMTOOL = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.executable).parent))
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (scripts/install-promtool.sh "
                                                             "takes it from Debian's prometheus package)")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}


def promql_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana's $variables allowed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\$\w+", "", expr)
    names = re.findall(r"(?<![\w.])([A-Za-z_:][\w:]*)(?!\w)(?!\s*\()", expr)
    return {n for n in names if n.lower() not in KEYWORDS}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values(METRIC{...}, label): a Grafana function around a selector
            exprs.append(re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"]).group(1))
    return exprs


def rule_exprs() -> list[str]:
    return [rule["expr"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_promql_names_finds_the_selectors_and_nothing_else():
    expr = ('histogram_quantile(0.9, sum by (le) (rate(a_bucket{x=~"$t", y="b c"}[5m]))) / on(instance) b '
            'unless c > 0 and (sum(increase(d_total[15m])) or vector(0)) == 0')
    assert promql_names(expr) == {"a_bucket", "b", "c", "d_total"}


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="the service runs jobs as its tenants' uids: needs root")
def test_every_metric_the_dashboard_and_the_rules_use_is_in_a_real_scrape(tmp_path):
    port = free_port()
    node = Node(tmp_path / "node", extra=f'metrics_address = "127.0.0.1:{port}"')
    try:
        jobs = [{"kernel": "ok.py", "source": "print(1)\n", "tenant": "bob"},
                {"kernel": "slow.py", "source": SLEEP, "argv": ["30"], "tenant": "bob", "limits": {"wall_time": "1s"}},
                {"kernel": "big.py", "source": "print(1)\n", "tenant": "bob", "limits": {"cpu_threads": 64}},
                {"kernel": "/etc/passwd"}]  # a path, not a file's contents: refused
        answers = node.ask({"op": "submit", "jobs": jobs, "follow": True, "output": False})
        verdicts = sorted(a["result"]["verdict"] for a in answers if a["type"] == "result")
        assert verdicts == ["ok", "rejected", "wall_time"], answers
        assert [j["state"] for j in answers[0]["jobs"]][3] == "refused"
        running = node.ask({"op": "submit", "jobs": [{"kernel": "s.py", "source": SLEEP, "argv": ["60"],
                                                      "tenant": "alice"}]})[0]["jobs"][0]["job_id"]
        deadline = time.monotonic() + 60
        while not any(j["state"] == "running" and j["usage"] for j in node.ask({"op": "ps"})[0]["jobs"]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        text = scrape(port)
        node.ask({"op": "cancel", "job_id": running})
    finally:
        assert node.stop() == 0
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    wanted = {name for expr in dashboard_exprs() + rule_exprs() for name in promql_names(expr)}
    assert wanted - FROM_PROMETHEUS - set(samples) == set()
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
            "process_start_time_seconds", "taichi_sandbox_cpu_seconds_total"} <= wanted
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in samples.values()}
    assert samples["taichi_sandbox_job_memory_bytes"].labels == {"tenant": "alice"}
    assert samples["taichi_sandbox_job_memory_bytes"].value > 1 << 20  # a real Python's memory
    assert 0 < samples["process_start_time_seconds"].value <= time.time()
    assert ("taichi_sandbox_refused_requests_total", (("reason", "BadRequest"),)) in values
    assert samples["taichi_sandbox_node_memory_available_bytes"].value > 0
    if PROMTOOL is not None:  # the exposition itself passes Prometheus's linter
        linted = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
        assert linted.returncode == 0, linted.stdout + linted.stderr


@needs_promtool
def test_promtool_accepts_the_rules_and_their_unit_tests():
    checked = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0 and "SUCCESS: 12 rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = subprocess.run([PROMTOOL, "test", "rules", "taichi-sandbox-rules.test.yml"], cwd=RULES.parent,
                            capture_output=True, text=True)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_expression(tmp_path):
    """Each panel's query, its Grafana variables given values, as a recording rule promtool must parse."""
    grafana = {"$__rate_interval": "5m", "$instance": ".*", "$tenant": ".*", "$job": "taichi-sandbox"}
    rules = []
    for number, expr in enumerate(dashboard_exprs()):
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:panel{number}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    checked = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="the service runs jobs as its tenants' uids: needs root")
def test_a_metrics_address_in_use_is_a_one_line_error(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        limits = tmp_path / "limits.toml"
        limits.write_text(f'[sandbox]\nstate_dir = "{tmp_path / "state"}"\n'
                          f'[service]\nsocket = "{tmp_path / "s.sock"}"\nmetrics_address = "127.0.0.1:{port}"\n')
        done = subprocess.run([sys.executable, "-m", "sandbox", "serve", "--limits-file", str(limits)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr == (f"taichi-sandbox: error: [service] metrics_address 127.0.0.1:{port}: cannot serve /metrics "
                           "there: Address already in use\n")
    limits.write_text('[service]\nmetrics_address = "9464"\n')
    checked = subprocess.run([sys.executable, "-m", "sandbox", "serve", "--check", "--limits-file", str(limits)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 2 and checked.stderr == (
        f'taichi-sandbox: error: {limits} [service]: metrics_address=\'9464\': give HOST:PORT, e.g. "127.0.0.1:9464" '
        'or "[::1]:9464"\n')


def test_process_metrics_are_served_but_left_out_of_the_textfile(tmp_path):
    """node-exporter serves its own process_* and would refuse a textfile that has them too."""
    metrics = Metrics()
    server, _ = metrics.serve(0)
    try:
        served = scrape(server.server_port)
    finally:
        server.shutdown()
    metrics.write_textfile(str(tmp_path / "m.prom"))
    assert "\nprocess_open_fds " in served and "process_" not in (tmp_path / "m.prom").read_text()


def test_the_dashboard_uses_only_its_own_variables_and_panels_do_not_overlap():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]} | {"__rate_interval"}
    used = {name for expr in dashboard_exprs() for name in re.findall(r"\$\{?(\w+)", expr)}
    used |= {p["datasource"]["uid"].strip("${}") for p in dashboard["panels"] if "datasource" in p}
    assert used <= variables, used - variables
    cells = [(x, y) for p in dashboard["panels"] for g in [p["gridPos"]]
             for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])]
    assert len(cells) == len(set(cells)) and max(x for x, _ in cells) < 24
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
