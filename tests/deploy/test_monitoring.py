"""The Grafana dashboard and the alert rules query only the metrics imgpipe exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import ROOT

pytestmark = pytest.mark.deploy

MONITORING = ROOT / "deploy" / "monitoring"

# Every metric an imgpipe process serves on :9464/metrics, with its labels.
COUNTERS_AND_GAUGES = {
    "imgpipe_images_total": {"outcome", "code"},
    "imgpipe_image_bytes_total": {"direction"},
    "imgpipe_stream_lag": {"stream", "group"},
    "imgpipe_stream_pending": {"stream", "group"},
    "imgpipe_dead_letter_entries": set(),
    "imgpipe_backlog_images": set(),
    "imgpipe_stream_oldest_age_seconds": {"stream", "group"},
    "imgpipe_db_pool_connections": {"state"},
    "imgpipe_db_pool_max_connections": set(),
    "imgpipe_db_pool_waiting": set(),
    "imgpipe_webhook_attempts_total": {"result"},
    "imgpipe_retention_requests_deleted_total": set(),
    "imgpipe_retention_bytes_deleted_total": set(),
    "imgpipe_images_reused_total": set(),
    "imgpipe_images_deferred_total": {"reason"},
    "imgpipe_tasks_reclaimed_total": set(),
    "imgpipe_releases_superseded_total": set(),
    "imgpipe_feeder_lookahead_tasks": set(),
    "grpc_server_handled_total": {"grpc_service", "grpc_method", "grpc_code"},
    "http_requests_total": {"method", "route", "status"},
}
HISTOGRAMS = {
    "imgpipe_stage_duration_seconds": {"stage"},
    "imgpipe_request_duration_seconds": {"status"},
    "imgpipe_budget_wait_seconds": {"budget"},
    "imgpipe_worker_batch_size": {"batch"},
    "grpc_server_handling_seconds": {"grpc_service", "grpc_method"},
    "http_request_duration_seconds": {"method", "route"},
}
METRICS: dict[str, set[str]] = dict(COUNTERS_AND_GAUGES)
for _name, _labels in HISTOGRAMS.items():
    METRICS[f"{_name}_bucket"] = _labels | {"le"}
    METRICS[f"{_name}_sum"] = _labels
    METRICS[f"{_name}_count"] = _labels
# Added by Prometheus when it scrapes a pod.
TARGET_LABELS = {"namespace", "pod", "container", "job", "instance"}

_STRING = re.compile(r'"(?:\\.|[^"\\])*"')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\]]*\]")
_IDENTIFIER = re.compile(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def referenced(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names a PromQL expression uses."""
    text = _STRING.sub('""', expr)
    labels: set[str] = set()
    for _, matchers in _SELECTOR.findall(text):
        labels |= set(_MATCHER.findall(matchers))
    text = _SELECTOR.sub(lambda m: m.group(1) or "", text)
    for _, grouping in _GROUPING.findall(text):
        labels |= {name.strip() for name in grouping.split(",") if name.strip()}
    text = _RANGE.sub("", _GROUPING.sub("", text))
    names = {
        name
        for name, call in _IDENTIFIER.findall(text)
        if not call and name not in _KEYWORDS and not name.startswith("$")
    }
    return names, labels


def check(expr: str, where: str) -> None:
    assert expr.count("(") == expr.count(")"), f"{where}: unbalanced parentheses"
    assert expr.count("{") == expr.count("}"), f"{where}: unbalanced braces"
    names, labels = referenced(expr)
    assert names, f"{where}: queries no metric"
    unknown = names - set(METRICS)
    assert not unknown, f"{where}: unknown metrics {sorted(unknown)}"
    known_labels = set().union(*(METRICS[name] for name in names)) | TARGET_LABELS
    assert labels <= known_labels, f"{where}: unknown labels {sorted(labels - known_labels)}"


def test_the_expression_reader_finds_metrics_and_labels() -> None:
    names, labels = referenced(
        "histogram_quantile(0.95, sum by (route, le) (rate(http_request_duration_seconds_bucket"
        '{route!~".*/events",namespace="$namespace"}[$__rate_interval]))) > 1'
    )
    assert names == {"http_request_duration_seconds_bucket"}
    assert labels == {"route", "le", "namespace"}
    with pytest.raises(AssertionError, match="unknown metrics"):
        check("sum(rate(imgpipe_images_processed_total[5m]))", "typo")
    with pytest.raises(AssertionError, match="unknown labels"):
        check('sum(rate(imgpipe_images_total{status="done"}[5m]))', "wrong label")


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    assert document["kind"] == "PrometheusRule"
    assert document["apiVersion"] == "monitoring.coreos.com/v1"
    return [rule for group in document["spec"]["groups"] for rule in group["rules"]]


def test_alerts_query_only_exported_metrics() -> None:
    for rule in rules():
        check(rule["expr"], rule["alert"])


def test_alerts_are_complete_and_unique() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names))
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]


def test_the_reclaim_alert_fires_past_one_busy_workers_death() -> None:
    # One worker holds at most 2 x its concurrency tasks (services/worker/runner.py Slots).
    kustomization = (ROOT / "deploy" / "k8s" / "base" / "kustomization.yaml").read_text()
    concurrency = re.search(r"IMGPIPE_WORKER_CONCURRENCY=(\d+)", kustomization)
    [rule] = [rule for rule in rules() if rule["alert"] == "ImgpipeTasksReclaimed"]
    threshold = re.search(r"> (\d+)$", rule["expr"].strip())
    assert concurrency is not None and threshold is not None
    assert int(threshold.group(1)) == 2 * int(concurrency.group(1))


def test_alerts_cover_the_backlog_dead_letters_and_error_rates() -> None:
    used = set()
    for rule in rules():
        used |= referenced(rule["expr"])[0]
    # The backlog, not the stream's lag: the stream holds only the scheduler's window.
    assert {
        "imgpipe_backlog_images",
        "imgpipe_dead_letter_entries",
        "imgpipe_images_total",
        "grpc_server_handled_total",
        "http_requests_total",
    } <= used


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids))
    queried = 0
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            check(target["expr"], panel["title"])
            queried += 1
    assert queried >= 10
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            metric = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert metric and metric[1] in METRICS, query


def test_the_names_match_what_the_services_register() -> None:
    # The stream and pool gauges (lag, pending, dead letters) come from collectors registered
    # at run time; the counters, the histograms and the feeder's gauge exist as soon as
    # services.common.metrics is imported.
    client = pytest.importorskip("prometheus_client")
    pytest.importorskip("services.common.metrics")
    registered = {
        family.name
        for family in client.REGISTRY.collect()
        if family.name.startswith(("imgpipe_", "grpc_server_", "http_request"))
    }
    expected = {name.removesuffix("_total") for name in COUNTERS_AND_GAUGES if "_total" in name}
    assert registered == expected | set(HISTOGRAMS) | {"imgpipe_feeder_lookahead_tasks"}
