"""The shipped Grafana dashboard queries exactly the metrics the service exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from exhook.metrics import PREFIX, Metrics

DASHBOARD = Path(__file__).resolve().parent.parent / "monitoring" / "grafana-dashboard.json"
# the service's own families, and the standard process_* ones (prometheus-client's ProcessCollector)
METRIC = re.compile(rf"\b(?:{PREFIX}|process_)[a-z_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def exposed() -> dict[str, str]:
    """Every sample name /metrics can show -> its family name."""
    names = {}
    for family in Metrics().registry.collect():
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = family.name
    return names


def panels() -> list[dict[str, Any]]:
    return [p for p in json.loads(DASHBOARD.read_text())["panels"] if p["type"] != "row"]


def test_every_query_names_an_exposed_metric() -> None:
    names = exposed()
    for panel in panels():
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used = METRIC.findall(target["expr"])
            assert used, target["expr"]
            unknown = [name for name in used if name not in names]
            assert not unknown, f"{panel['title']}: {unknown}"
            assert 'instance=~"$instance"' in target["expr"]


def test_every_metric_family_has_a_panel() -> None:
    used = {name for p in panels() for t in p["targets"] for name in METRIC.findall(t["expr"])}
    names = exposed()
    assert {names[n] for n in used} == set(names.values())


def test_panels_do_not_overlap_and_use_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource", "instance"]
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, panel["title"]
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
