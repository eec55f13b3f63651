"""ops/prometheus: alert rules reference only declared metrics, every alert has firing and
non-firing unit tests, and promtool accepts the config, the rules and the rule tests."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from unirec.ops.config import ServingConfig
from unirec.ops.metrics import DEFAULT_BIND, PipelineMetrics

PROM_DIR = Path(__file__).resolve().parents[2] / "ops" / "prometheus"
_NAME = re.compile(r"unirec_[a-z_]+")
_SERIES_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def referenced_metrics(expr: str) -> set[str]:
    """`unirec_*` names in a PromQL expression, histogram series mapped to their metric."""
    return {_SERIES_SUFFIX.sub("", name) for name in _NAME.findall(expr)}


def _rules() -> list[dict]:
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_referenced_metrics_parses_promql_crudely():
    expr = ('histogram_quantile(0.9, sum by (le) (rate(unirec_microbatch_duration_seconds_bucket[5m])))'
            ' / unirec_events_consumed_total{job="unirec-pipeline"}')
    assert referenced_metrics(expr) == {"unirec_microbatch_duration_seconds", "unirec_events_consumed_total"}


def test_every_metric_in_the_alert_rules_is_declared():
    declared = PipelineMetrics().names()
    used = {name: rule["alert"] for rule in _rules() for name in referenced_metrics(rule["expr"])}
    assert len(used) >= 10
    unknown = {name: alert for name, alert in used.items() if name not in declared}
    assert not unknown, f"alerts.yml uses metrics that ops/metrics.py does not declare: {unknown}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())["tests"]
    cases = [case for t in tests for case in t["alert_rule_test"]]
    firing = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    alerts = {rule["alert"] for rule in _rules()}
    assert alerts - firing == set(), "alerts without a firing case"
    assert alerts - quiet == set(), "alerts without a non-firing case"


def test_every_drift_alert_waits_for_warm_up():
    """Drift alerts also need a few comparisons of their kind since the process started
    (alerts_test.yml shows them quiet during warm-up and firing after)."""
    drift_rules = [r for r in _rules() if any(n.startswith("unirec_drift_") for n in referenced_metrics(r["expr"]))]
    assert len(drift_rules) >= 8
    for rule in drift_rules:
        assert re.search(r'unirec_drift_comparisons_total\{kind="(input|score|embedding)"\} >= \d', rule["expr"]), \
            rule["alert"]


def test_default_scrape_targets_are_the_default_binds():
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}

    def targets(job):
        return [t for f in job["file_sd_configs"][0]["files"] for path in PROM_DIR.glob(f)
                for group in yaml.safe_load(path.read_text()) for t in group["targets"]]

    assert set(jobs) == {"unirec-pipeline", "unirec-serve"}
    assert targets(jobs["unirec-pipeline"]) == [DEFAULT_BIND]
    assert targets(jobs["unirec-serve"]) == [ServingConfig().bind]


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=120)


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool not installed (Debian package `prometheus`; `make setup` installs it)")
@pytest.mark.parametrize("args", [
    ("check", "config", "prometheus.yml"),
    ("check", "rules", "alerts.yml"),
    ("test", "rules", "alerts_test.yml"),
], ids=["check-config", "check-rules", "test-rules"])
def test_promtool_accepts(args):
    res = _promtool(*args)
    assert res.returncode == 0, f"promtool {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
