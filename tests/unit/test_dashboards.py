"""The Grafana dashboard and the alert rules of helm/passthrough, read as files: their
structure, and that every metric they name is one the service defines. (The e2e test
tests/e2e/test_door.py scrapes a real server for them and runs `promtool check rules`.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.support.dashboards import (
    DASHBOARD,
    REPO,
    RULES,
    check_rule_groups,
    dashboard_queries,
    metric_names,
    rule_queries,
)

DEFINED_IN = ("passthrough/observe/metrics.py", "passthrough/web/metrics.py")
SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def defined_metrics() -> set[str]:
    """The metric names the code spells out (counters get ``_total`` in the exposition)."""
    text = "".join((REPO / path).read_text(encoding="utf-8") for path in DEFINED_IN)
    names = set(re.findall(r'"(passthrough_[a-z0-9_]+)"', text))
    names |= {f"passthrough_{n}" for n in re.findall(r'"(cache_[a-z_]+)"', text)}
    return names


def base_name(series: str) -> str:
    for suffix in SUFFIXES:
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def test_the_dashboard_is_a_grafana_dashboard_on_a_chosen_datasource() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] == "passthrough" and dashboard["schemaVersion"] >= 36
    [variable] = dashboard["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    graphs = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_the_dashboard_covers_each_concern() -> None:
    named = {base_name(n) for n in metric_names(dashboard_queries())}
    for concern in (
        "passthrough_downloads", "passthrough_download_sent_bytes",
        "passthrough_download_duration_seconds", "passthrough_cache_hits",
        "passthrough_upstream_requests", "passthrough_push_bytes", "passthrough_store_bytes",
        "passthrough_store_cap_bytes", "passthrough_v2_requests", "passthrough_transfers_refused",
        "passthrough_connections_dropped",
    ):  # fmt: skip
        assert concern in named, concern


def test_every_metric_named_is_one_the_service_defines() -> None:
    named = metric_names(dashboard_queries() + rule_queries())
    unknown = {n for n in named if base_name(n) not in defined_metrics()}
    assert not unknown


def test_the_rule_file_has_the_three_alerts() -> None:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    check_rule_groups(document)
    alerts = {rule["alert"]: rule for rule in document["groups"][0]["rules"]}
    assert "connection_error" in alerts["PassthroughUpstreamUnreachable"]["expr"]
    assert "passthrough_store_cap_bytes" in alerts["PassthroughStoreNearCap"]["expr"]
    assert '"5.."' in alerts["PassthroughHigh5xxRate"]["expr"]


def scrape_gauges(config: dict[str, str]) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    from passthrough import create_app

    text = create_app(config).test_client().get("/metrics").get_data(as_text=True)
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("passthrough_store_")
    }


def test_metrics_report_the_store_against_its_cap(tmp_path: Path) -> None:
    base = {"ENV_FILE": "/nonexistent", "TEMP_DIR": str(tmp_path)}
    gauges = scrape_gauges({**base, "CACHE_DIR": str(tmp_path / "s"), "CACHE_MAX_BYTES": "3G"})
    assert gauges == {
        "passthrough_store_bytes": 0.0,
        "passthrough_store_pinned_bytes": 0.0,
        "passthrough_store_cap_bytes": float(3 << 30),
    }
    assert scrape_gauges({**base, "STORE": "off"}) == {}, "no store, no store gauges"
