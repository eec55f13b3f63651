"""The run report (`unirec report`): PNG plots of a run and an HTML page that shows them.

Reads two things a run leaves behind:

* the **run log** (`monitoring.log_path`, JSON lines from `unirec.ops.monitor.Monitor`).
  Only the last run's lines (from the last `start` line on) unless `all_runs`; torn
  or non-JSON lines (a crash mid-write) are skipped and counted on the page.
* the **registry** (`Registry.list_versions()`): each version's manifest metrics,
  watermark and size. A version whose embedding drift is not in the log (an earlier
  run, or a log that was deleted) gets it computed from the registry against its
  parent, if both are still retained, with the same function the monitor uses.

Writes into `out_dir`: ndcg.png (test-then-train NDCG@10 and HR@10 over the run,
with each published version's figure), loss.png (loss per head), weights.png
(adaptive loss weights), drift.png (embedding drift per version),
input_drift.png (input windows and ranking-score windows), throughput.png (records/s
and consumer lag), and index.html. The x axis is wall time since the run's first
log line: a full-speed replay covers months of event time in minutes, so event time
would squash the run. Figures are drawn with matplotlib's object API (`Figure`, Agg
canvas: no display, no pyplot global state); a figure without data says so.
"""
from __future__ import annotations

import html
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from unirec.ops import drift
from unirec.ops.registry import Registry, RegistryError

SMOOTH = 20          # points in the rolling mean drawn over noisy per-step figures


class ReportError(Exception):
    """Nothing to report (no run log and no published version)."""


@dataclass
class RunData:
    lines: list[dict] = field(default_factory=list)
    skipped: int = 0
    runs: int = 0

    def of(self, kind: str) -> list[dict]:
        return [x for x in self.lines if x.get("kind") == kind and "error" not in x]

    @property
    def t0(self) -> float | None:
        return self.lines[0]["t"] if self.lines else None


def read_log(path: str | Path, *, all_runs: bool = False) -> RunData:
    """The run log's lines with a numeric `t` and a `kind` (the last run's, unless `all_runs`)."""
    out = RunData()
    try:
        raw = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return out
    for text in raw:
        try:
            rec = json.loads(text)
        except json.JSONDecodeError:
            out.skipped += int(bool(text.strip()))
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("t"), (int, float)) or "kind" not in rec:
            out.skipped += 1
            continue
        if rec["kind"] == "start":
            out.runs += 1
            if not all_runs:
                out.lines = []
        out.lines.append(rec)
    return out


def _get(rec: dict, key: str) -> float | None:
    """`key`, or `outer.inner` for a nested dict; a finite number or None."""
    for part in key.split(".", 1)[:-1]:
        rec = rec.get(part) if isinstance(rec.get(part), dict) else {}
    v = rec.get(key.split(".", 1)[-1])
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def series(lines: list[dict], key: str, t0: float) -> tuple[np.ndarray, np.ndarray]:
    """(seconds since t0, values) of `key` over the lines that have it."""
    pts = [(x["t"] - t0, v) for x in lines if (v := _get(x, key)) is not None]
    return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])


def rolling_mean(y: np.ndarray, n: int = SMOOTH) -> np.ndarray:
    """Mean of the last `n` points at each point (fewer at the start)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    idx = np.arange(1, len(y) + 1)
    lo = np.maximum(0, idx - n)
    return (c[idx] - c[lo]) / (idx - lo)


def _when(iso: str | None) -> float | None:
    try:
        return datetime.fromisoformat(str(iso).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# ---- figures -----------------------------------------------------------------------------------
def _save(fig: Figure, path: Path, *axes: tuple[Any, bool]) -> None:
    """Legends, grids and a "no data" note on each (axes, empty), then write the PNG."""
    for ax, empty in axes:
        if empty:
            ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes, color="grey")
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _curves(path: Path, title: str, ylabel: str, data: RunData, kind: str, keys: dict[str, str],
            smooth: bool = False) -> bool:
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    drawn = False
    for key, name in keys.items():
        x, y = series(data.of(kind), key, data.t0 or 0.0)
        if len(x):
            drawn = True
            line, = ax.plot(x, y, lw=0.8, alpha=0.45 if smooth else 1.0, label=name)
            if smooth:
                ax.plot(x, rolling_mean(y), lw=1.8, color=line.get_color(), label=f"{name} (mean of {SMOOTH})")
    ax.set(title=title, xlabel="seconds since the run started", ylabel=ylabel)
    _save(fig, path, (ax, not drawn))
    return drawn


def plot_ndcg(path: Path, data: RunData, versions: list) -> bool:
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    drawn = False
    for key, name in (("eval.ndcg@10", "NDCG@10"), ("eval.hr@10", "HR@10")):
        x, y = series(data.of("train"), key, data.t0 or 0.0)
        if len(x):
            drawn = True
            line, = ax.plot(x, y, lw=0.6, alpha=0.35)
            ax.plot(x, rolling_mean(y), lw=1.8, color=line.get_color(), label=f"test-then-train {name}")
    pts = [(t - data.t0, v.metrics.get("ndcg@10")) for v in versions
           if data.t0 is not None and (t := _when(v.created_at)) is not None and t >= data.t0
           and isinstance(v.metrics.get("ndcg@10"), (int, float))]
    if pts:
        drawn = True
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="D", s=18, color="black",
                   label="NDCG@10 of a published version", zorder=3)
    ax.set(title="Test-then-train quality (each batch scored before training on it)",
           xlabel="seconds since the run started", ylabel="metric")
    _save(fig, path, (ax, not drawn))
    return drawn


def plot_drift(path: Path, per_version: list[tuple[str, float | None, float | None]]) -> bool:
    fig = Figure(figsize=(8, 3.6))
    ax = fig.add_subplot()
    rows = [r for r in per_version if r[1] is not None or r[2] is not None]
    if rows:
        x = np.arange(len(rows))
        cos = [np.nan if r[1] is None else r[1] for r in rows]
        ovl = [np.nan if r[2] is None else r[2] for r in rows]
        ax.plot(x, cos, "o-", label="mean cosine distance to the previous version")
        ax.plot(x, ovl, "s-", label="top-10 neighbour overlap")
        ax.axhline(0.3, ls="--", lw=0.8, color="C0", alpha=0.6)
        ax.axhline(0.5, ls="--", lw=0.8, color="C1", alpha=0.6)
        ax.set_xticks(x, [r[0] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set(title="Embedding drift per published version (dashed: alert thresholds)", ylabel="")
    _save(fig, path, (ax, not rows))
    return bool(rows)


def plot_input_drift(path: Path, data: RunData) -> bool:
    fig = Figure(figsize=(8, 6))
    top, bottom = fig.subplots(2, 1)
    drawn = [False, False]
    windows = [x for x in data.of("input_drift") if x.get("closed")]
    for key, name in (("item_popularity_js", "item popularity JS"), ("query_terms_js", "query terms JS"),
                      ("new_item_share", "new items"), ("new_user_share", "new users")):
        pts = [(i, v) for i, x in enumerate(windows, 1) if (v := _get(x, key)) is not None]
        if pts:
            drawn[0] = True
            top.plot([p[0] for p in pts], [p[1] for p in pts], ".-", label=name)
    top.set(title="Input drift per window (vs the previous window)", xlabel="window", ylim=(0, 1.05))
    for key, name in (("score_psi", "ranking-score PSI"), ("calibration_gap", "calibration gap"),
                      ("calibration_ece", "ECE")):
        x, y = series(data.of("train"), key, data.t0 or 0.0)
        if len(x):
            drawn[1] = True
            bottom.plot(x, y, ".-", label=name)
    bottom.set(title="Ranking scores per window", xlabel="seconds since the run started")
    _save(fig, path, (top, not drawn[0]), (bottom, not drawn[1]))
    return any(drawn)


def plot_throughput(path: Path, data: RunData) -> bool:
    fig = Figure(figsize=(8, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    batches = data.of("batch")
    t0 = data.t0 or 0.0
    pts = [(x["t"] - t0, r / s) for x in batches if (r := _get(x, "records")) is not None
           and (s := _get(x, "seconds")) and s > 0]
    if pts:
        top.plot([p[0] for p in pts], [p[1] for p in pts], ".-", lw=0.8, label="records/s within a batch")
        if len(batches) > 1:   # offered load: records per second of wall time between batches
            t = np.array([x["t"] for x in batches]) - t0
            r = np.array([_get(x, "records") or 0.0 for x in batches])
            top.plot(t[1:], r[1:] / np.maximum(np.diff(t), 1e-3), lw=1.2, label="records/s over the run")
    top.set(title="Throughput", ylabel="records / s")
    x, y = series(batches, "lag", t0)
    if len(x):
        bottom.plot(x, y, ".-", color="C3", label="consumer lag (all partitions)")
    bottom.set(title="Consumer lag after each batch", xlabel="seconds since the run started", ylabel="records")
    _save(fig, path, (top, not pts), (bottom, not len(x)))
    return bool(pts) or bool(len(x))


# ---- drift per version -------------------------------------------------------------------------
def drift_per_version(data: RunData, reg: Registry | None, versions: list, *,
                      max_items: int = 5000) -> list[tuple[str, float | None, float | None]]:
    """(version, cosine distance, neighbour overlap) per version, oldest first: from the log's
    publish lines, else computed from the registry against the parent (both retained)."""
    logged = {x["version"]: (_get(x, "embedding_cosine_distance"), _get(x, "embedding_neighbour_overlap"))
              for x in data.of("publish") if x.get("accepted") and x.get("version")}
    retained = {v.version for v in versions}
    out: dict[str, tuple] = dict(logged)
    for v in versions:
        if reg is None or logged.get(v.version, (None, None)) != (None, None):
            continue
        if v.parent in retained:
            try:
                a, b = reg.load(v.parent), reg.load(v.version)
                d = drift.embedding_drift(a.item_ids, a.item_embeddings, b.item_ids, b.item_embeddings,
                                          max_items=max_items)
                out[v.version] = (None if math.isnan(d.mean_cosine_distance) else d.mean_cosine_distance,
                                  None if math.isnan(d.neighbour_overlap) else d.neighbour_overlap)
            except (RegistryError, ValueError):
                continue
    order = {name: i for i, name in enumerate(v.version for v in versions)}
    return sorted(((k, *val) for k, val in out.items()), key=lambda r: (order.get(r[0], -1), r[0]))


# ---- the page ----------------------------------------------------------------------------------
FIGURES = (("ndcg.png", "Test-then-train NDCG@10 over time"), ("loss.png", "Training loss per head"),
           ("weights.png", "Adaptive loss weights"), ("drift.png", "Embedding drift per version"),
           ("input_drift.png", "Input and ranking-score drift"), ("throughput.png", "Throughput and lag"))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else html.escape(str(v))


def write_html(path: Path, data: RunData, versions: list, drifts: list, log_path: str, registry_path: str) -> None:
    kinds = Counter(x.get("kind") for x in data.lines)
    publishes = data.of("publish")
    records = sum(_get(x, "records") or 0 for x in data.of("batch"))
    start = datetime.fromtimestamp(data.t0, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if data.t0 else "-"
    drift_of = {r[0]: r[1:] for r in drifts}
    rows = "".join(
        f"<tr><td>{html.escape(v.version)}</td><td>{_fmt(v.parent)}</td><td>{_fmt(v.created_at)}</td>"
        f"<td>{_fmt(v.watermark)}</td><td>{v.item_count}</td>"
        + "".join(f"<td>{_fmt(v.metrics.get(k))}</td>" for k in ("ndcg@10", "hr@10", "auc", "eval_events"))
        + "".join(f"<td>{_fmt(x)}</td>" for x in drift_of.get(v.version, (None, None))) + "</tr>"
        for v in versions)
    figures = "".join(f'<figure><img src="{name}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}'
                      f"</figcaption></figure>" for name, cap in FIGURES)
    summary = (f"run started {start}; {int(records):,} records in {kinds['batch']} batches; "
               f"{kinds['train']} training reports; {sum(1 for p in publishes if p.get('accepted'))} published, "
               f"{sum(1 for p in publishes if not p.get('accepted'))} refused by the gate; "
               f"{sum(1 for x in data.lines if 'error' in x)} monitor errors")
    if data.skipped:
        summary += f"; {data.skipped} unreadable log lines skipped"
    path.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>unirec run report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}} figure{{display:inline-block;margin:0.5em}}
img{{max-width:100%;border:1px solid #ddd}} table{{border-collapse:collapse;font-size:0.9em}}
td,th{{border:1px solid #ccc;padding:0.2em 0.5em;text-align:right}}</style></head>
<body><h1>unirec run report</h1>
<p>{html.escape(summary)}.</p>
<p>Run log: <code>{html.escape(log_path)}</code>; registry: <code>{html.escape(registry_path)}</code>.</p>
{figures}
<h2>Published versions ({len(versions)} retained)</h2>
<table><tr><th>version</th><th>parent</th><th>created</th><th>watermark</th><th>items</th><th>NDCG@10</th>
<th>HR@10</th><th>AUC</th><th>eval events</th><th>cosine distance</th><th>neighbour overlap</th></tr>
{rows}</table></body></html>
""", encoding="utf-8")


def write_report(log_path: str | Path, registry_path: str | Path, out_dir: str | Path, *,
                 all_runs: bool = False, max_drift_items: int = 5000) -> Path:
    """Write the plots and index.html into `out_dir`; returns the HTML path."""
    data = read_log(log_path, all_runs=all_runs)
    try:
        reg = Registry(registry_path, create=False)
        versions = reg.list_versions()
    except (RegistryError, OSError):
        reg, versions = None, []
    if not data.lines and not versions:
        raise ReportError(f"nothing to report: no run log at {log_path} and no published version in {registry_path}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drifts = drift_per_version(data, reg, versions, max_items=max_drift_items)
    plot_ndcg(out / "ndcg.png", data, versions)
    _curves(out / "loss.png", "Training loss per head", "loss", data, "train",
            {"loss_retrieval": "retrieval", "loss_ranking": "ranking", "loss_search": "search"}, smooth=True)
    _curves(out / "weights.png", "Adaptive loss weights", "weight", data, "train",
            {"w_retrieval": "retrieval weight", "w_ranking": "ranking weight"})
    plot_drift(out / "drift.png", drifts)
    plot_input_drift(out / "input_drift.png", data)
    plot_throughput(out / "throughput.png", data)
    page = out / "index.html"
    write_html(page, data, versions, drifts, str(log_path), str(registry_path))
    return page
