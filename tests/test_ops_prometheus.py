"""Monitoring assets: promtool on the rules, the dashboard's shape, and a real Prometheus scraping a real service."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from serverutil import free_port, running_server
from testkit import wait_for

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "rules" / "continual-alerts.yml"
RULE_TESTS = DEPLOY / "rules" / "continual-alerts.test.yml"
DASHBOARD = DEPLOY / "grafana" / "continual-dashboard.json"

# Grafana fills these in; the test stands in with what a one-service setup would send.
VARIABLES = {"$__rate_interval": "30s", "$job": "continual", "$instance": ".*"}

# Targets that stay empty on an idle service even though their metrics are exposed:
# they filter out the 0 a timestamp gauge holds until the first run / drift check.
EMPTY_WHEN_IDLE = {
    ("Training duration and last success", "C"),
    ("Since last drift check", "A"),
}


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package 'prometheus'; .ci/run installs it)")
    return path


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_need("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def _alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def _targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(panel title, refId, expr) for every panel query and annotation query."""
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            yield panel["title"], t["refId"], t["expr"]
    for a in dashboard["annotations"]["list"]:
        yield f"annotation {a['name']}", "-", a["expr"]


def _substitute(expr: str) -> str:
    for var, value in VARIABLES.items():
        expr = expr.replace(var, value)
    if "$" in expr:
        raise AssertionError(f"unknown dashboard variable in {expr!r}")
    return expr


# -- promtool --------------------------------------------------------------------------------
def test_promtool_check_config_and_rules() -> None:
    r = _promtool("check", "config", "deploy/prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(_alerts())} rules found" in r.stdout


def test_promtool_test_rules() -> None:
    r = _promtool("test", "rules", str(RULE_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_test_rules_fails_on_a_wrong_threshold(tmp_path: Path) -> None:
    # The unit tests can fail: raise the rejection threshold and the firing case breaks.
    (tmp_path / RULES.name).write_text(
        RULES.read_text().replace("continual_rejections_consecutive >= 3", "continual_rejections_consecutive >= 4")
    )
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    r = _promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert r.returncode != 0


def test_every_alert_is_documented_and_tested_both_ways() -> None:
    alerts = {a["alert"]: a for a in _alerts()}
    required = {
        "ContinualServiceDown",
        "ContinualTrainingStale",
        "ContinualDriftNotAddressed",
        "ContinualCandidatesRejected",
        "ContinualChampionLoadFailed",
        "ContinualFeedbackRejectionRateHigh",
        "ContinualLiveAccuracyBelowGate",
    }
    assert required <= set(alerts)
    for name, rule in alerts.items():
        ann = rule.get("annotations", {})
        assert ann.get("summary") and ann.get("description"), f"{name} needs summary and description"
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), name
    firing: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    assert firing == set(alerts), f"alerts without a firing test case: {set(alerts) - firing}"
    assert silent == set(alerts), f"alerts without a not-firing test case: {set(alerts) - silent}"


# -- the dashboard ---------------------------------------------------------------------------
def test_dashboard_uses_the_datasource_variable_everywhere() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ds = {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dash["panels"]:
        assert panel["datasource"] == ds, panel["title"]
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == ds, (panel["title"], t["refId"])
    for a in dash["annotations"]["list"]:
        assert a["datasource"] == ds, a["name"]
    # Nothing pins a datasource of the machine it was exported from.
    assert "DS_PROMETHEUS" not in DASHBOARD.read_text()


def test_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = " ".join(e for _, _, e in _targets(json.loads(DASHBOARD.read_text())))
    for metric in (
        "continual_feedback_samples_total",
        "continual_feedback_rejected_total",
        "continual_samples_pending",
        "continual_drift_score",
        "continual_drift_p_value",
        "continual_training_runs_total",
        "continual_training_failures_total",
        "continual_promotions_total",
        "continual_rejections_total",
        "continual_model_accuracy_ratio",
        "continual_model_info",
        "continual_predict_latency_seconds_bucket",
        # gate vs live vs estimated accuracy
        "continual_gate_accuracy_ratio",
        "continual_live_accuracy_ratio",
        "continual_estimated_accuracy_ratio",
        # new classes: how close each is to joining the model
        "continual_class_samples",
    ):
        assert metric in exprs, metric
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.99," in exprs


def _defined_metric_names() -> set[str]:
    from continual.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names.update(family.name + s for s in suffixes)
    return names


def test_dashboard_and_rules_use_only_defined_metrics() -> None:
    # A typo would make a panel silently empty; every name must be one continual.metrics defines.
    defined = _defined_metric_names()
    dash = json.loads(DASHBOARD.read_text())
    used = {m for _, _, e in _targets(dash) for m in re.findall(r"\bcontinual_[a-z0-9_]+", e)}
    used |= {m for a in _alerts() for m in re.findall(r"\bcontinual_[a-z0-9_]+", a["expr"])}
    assert used - defined == set(), f"not defined in continual/metrics.py: {sorted(used - defined)}"


# -- a real Prometheus scraping a real service -----------------------------------------------
@dataclass
class Live:
    prom: str
    service: str
    exposed: set[str]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    prometheus = _need("prometheus")
    tmp = tmp_path_factory.mktemp("prometheus")
    with ExitStack() as stack:
        service = stack.enter_context(running_server(workdir=tmp / "service"))
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "continual", "static_configs": [{"targets": [service.removeprefix("http://")]}]}
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = stack.enter_context((tmp / "prometheus.log").open("wb"))
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        stack.callback(lambda: (proc.terminate(), proc.wait(timeout=30)))
        prom = f"http://127.0.0.1:{port}"

        def log_tail() -> str:
            return (tmp / "prometheus.log").read_text(errors="replace")[-3000:]

        try:
            wait_for(
                lambda: proc.poll() is None and httpx.get(prom + "/-/ready").status_code == 200, 60, "Prometheus ready"
            )
            wait_for(lambda: _query(prom, 'up{job="continual"} == 1'), 60, "Prometheus scraping the service")
        except TimeoutError as e:
            raise AssertionError(f"{e}\nprometheus log:\n{log_tail()}") from None
        text = httpx.get(service + "/metrics").text
        exposed = {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", text, re.M)}
        yield Live(prom=prom, service=service, exposed=exposed | {"up"})


def _query_raw(prom: str, expr: str) -> dict[str, Any]:
    return httpx.get(prom + "/api/v1/query", params={"query": expr}, timeout=10).json()


def _query(prom: str, expr: str) -> list[Any]:
    body = _query_raw(prom, expr)
    if body.get("status") != "success":
        raise AssertionError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def _metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\b(continual_[a-z0-9_]+|up)\b(?=\s*[{\[)])", expr))


@pytest.mark.slow
def test_every_dashboard_query_runs_and_idle_panels_have_data(live: Live) -> None:
    dash = json.loads(DASHBOARD.read_text())
    targets = [(title, ref, _substitute(expr)) for title, ref, expr in _targets(dash)]
    for title, ref, expr in targets:
        body = _query_raw(live.prom, expr)
        assert body.get("status") == "success" and not body.get("warnings"), (title, ref, expr, body)
    expect_data = [
        (title, ref, expr)
        for title, ref, expr in targets
        if _metrics_in(expr) <= live.exposed
        and (title, ref) not in EMPTY_WHEN_IDLE
        and not title.startswith("annotation")  # events: empty until something is promoted or rolled back
    ]
    # The idle service exposes state, counters, pending samples, latency histograms, store_up...
    assert len(expect_data) >= 10, expect_data

    # rate() needs two scrapes inside its window: wait for them rather than sleeping a fixed time.
    def missing() -> list[tuple[str, str, str]]:
        return [t for t in expect_data if not _query(live.prom, t[2])]

    try:
        wait_for(lambda: not missing(), 30, "every panel with exposed metrics having data", 0.5)
    except TimeoutError:
        pytest.fail(f"panels without data although the service exposes their metrics: {missing()}")


@pytest.mark.slow
def test_dashboard_variables_resolve(live: Live) -> None:
    jobs = httpx.get(live.prom + "/api/v1/label/job/values", params={"match[]": "continual_state"}).json()
    assert "continual" in jobs["data"]
    instances = httpx.get(
        live.prom + "/api/v1/label/instance/values", params={"match[]": 'continual_state{job=~"continual"}'}
    ).json()
    assert live.service.removeprefix("http://") in instances["data"]


@pytest.mark.slow
def test_every_alert_expression_runs_and_is_quiet_on_a_healthy_service(live: Live) -> None:
    for rule in _alerts():
        result = _query(live.prom, rule["expr"])
        assert result == [], f"{rule['alert']} matches on a healthy idle service: {result}"

    # Prometheus itself loaded the file and evaluated every rule without error.
    def evaluated() -> list[dict[str, Any]]:
        groups = httpx.get(live.prom + "/api/v1/rules").json()["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules) else []

    rules = wait_for(evaluated, 30, "rules being evaluated")
    assert {r["name"] for r in rules} == {a["alert"] for a in _alerts()}
    for r in rules:
        assert r["health"] == "ok" and not r.get("lastError"), r
