"""The chart's Grafana dashboard and Prometheus rule file, as tests read them: their
PromQL expressions, the metric names those name, and a structural check of a rule
file (what `promtool check rules` checks, as far as it is structure)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "helm" / "passthrough" / "dashboards" / "passthrough.json"
RULES = REPO / "helm" / "passthrough" / "alerts" / "passthrough.rules.yaml"

_METRIC = re.compile(r"\bpassthrough_[a-z0-9_]+")
_DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")


def dashboard_queries() -> list[str]:
    """The PromQL of every target of every panel (rows' panels included)."""
    found: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            found.extend(target["expr"] for target in panel.get("targets", ()))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"])
    return found


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def metric_names(queries: list[str]) -> set[str]:
    """The series names the queries select (``passthrough_…``, suffixes included)."""
    return {name for query in queries for name in _METRIC.findall(query)}


def check_rule_groups(document: dict[str, Any]) -> None:
    """A Prometheus rule file's structure: named groups of alerting rules, each with an
    expression, a duration, a severity and a summary."""
    assert set(document) == {"groups"} and document["groups"]
    names = [group["name"] for group in document["groups"]]
    assert len(names) == len(set(names)), "group names are unique"
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert _DURATION.fullmatch(rule.get("for", "0s"))
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
