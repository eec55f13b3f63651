"""ops/grafana/unirec.json: importable Grafana JSON whose queries use only declared metrics and
which shows every declared metric. (tests/ops/test_prometheus_integration.py runs every query
against a real Prometheus, so a PromQL syntax error fails there.)"""
from __future__ import annotations

import json
import re
from pathlib import Path

from unirec.ops.metrics import PipelineMetrics, ServingMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "unirec.json"
_NAME = re.compile(r"unirec_[a-z_]+")
_SERIES_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def referenced_metrics(expr: str) -> set[str]:
    """`unirec_*` names in a PromQL expression, histogram series mapped to their metric
    (as in test_prometheus.py)."""
    return {_SERIES_SUFFIX.sub("", name) for name in _NAME.findall(expr)}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def declared() -> set[str]:
    return PipelineMetrics().names() | ServingMetrics().names()


def queries(d: dict) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets, annotations, template variables."""
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in d["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in d["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_metric_the_dashboard_queries_is_declared():
    used = {name for e in queries(dashboard()) for name in referenced_metrics(e)}
    assert len(used) >= 30
    assert used - declared() == set(), "the dashboard queries metrics that ops/metrics.py does not declare"


def test_every_declared_metric_is_on_the_dashboard():
    used = {name for e in queries(dashboard()) for name in referenced_metrics(e)}
    assert declared() - used == set(), "declared metrics without a dashboard panel"


def test_the_dashboard_is_importable_grafana_json():
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    # importing asks for the Prometheus data source; every query names it through that input
    assert [i["name"] for i in d["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in d["panels"] if p["type"] == "row"}
    assert titles == {"Pipeline health", "Model quality", "Drift", "Serving"}
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}" and t["refId"], p["title"]
    # panels do not overlap
    cells = set()
    for p in d["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
