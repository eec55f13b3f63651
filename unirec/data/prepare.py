"""`unirec data prepare`: MovieLens-100k -> the time-ordered click + query event stream.

Output, in `<cache_dir>/ml-100k/` (schemas in the project brief):

* `events.jsonl` - one click event per rating, in event-time order: a global
  *stable* sort by `ts`, so ties keep the rating file's order. Per user this is
  exactly RecBole's order (`Interaction.sort` uses `np.argsort(kind="stable")`
  on the timestamp), so the leave-one-out split in `unirec.data.split` sees the
  same sequences RecBole's sequential benchmark does. `label` = 1 iff rating >= 4.
  A share of clicks get a synthetic query (`unirec.data.queries`): the query
  event comes on the line right before its click, with the same `ts`, and the
  click gets `surface: "search"` and the `query_id`. Ids: clicks `c-1..c-N` and
  queries `q-1..q-M`, numbered in stream order.
* `items.jsonl` - one record per item of the item file, in file order.
* `rejected.jsonl` - only if some raw rows could not be parsed: the dead
  letters (file, line, reason, text); their count is in the summary.
* `manifest.json` - the fingerprint of the inputs (raw files, every config key
  that affects the output, and the source of the modules that write it) and
  the summary counts. A second run with the same fingerprint does nothing but
  re-read the manifest, so it takes well under a second. Files are written to
  temporaries and renamed, manifest last: an interrupted run is redone.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
from pathlib import Path

from unirec.data import queries, source
from unirec.data.config import DataConfig
from unirec.model import text as text_module

FORMAT = "unirec-ml100k/v1"


def _json(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def _fingerprint(cfg: DataConfig, raw: source.RawFiles) -> str:
    h = hashlib.sha256(FORMAT.encode())
    params = {"query_share": cfg.query_share, "seed": cfg.seed, "query_noise": dataclasses.asdict(cfg.query_noise)}
    h.update(json.dumps(params, sort_keys=True).encode())
    for path in (raw.ratings, raw.items):
        h.update(path.read_bytes())
    for module in (source, queries, text_module):  # code changes invalidate the cache too
        h.update(Path(module.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def _write(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_events(ratings: list[source.Rating], items: dict[str, dict], cfg: DataConfig) -> list[dict]:
    """The event stream: stable time order, queries synthesised for a seeded share of clicks."""
    order = sorted(range(len(ratings)), key=lambda i: ratings[i].ts)  # list.sort is stable
    clicks = [ratings[i] for i in order]
    all_genres = sorted({g for it in items.values() for g in it["genres"]})
    eligible = [
        p for p, r in enumerate(clicks)
        if r.item_id in items and (queries.title_words(items[r.item_id]["title"]) or items[r.item_id]["genres"])
    ]
    chosen = queries.choose_clicks(eligible, cfg.query_share, cfg.seed)
    events, n_queries = [], 0
    for p, r in enumerate(clicks):
        event_id, query_id = f"c-{p + 1}", None
        if p in chosen:
            rng = random.Random(f"{cfg.seed}/{event_id}")
            text = queries.synthesize(items[r.item_id], all_genres, cfg.query_noise, rng)
            if text:
                n_queries += 1
                query_id = f"q-{n_queries}"
                events.append({"schema": "query/v1", "event_id": query_id, "user_id": r.user_id,
                               "query_id": query_id, "text": text, "ts": r.ts})
        events.append({
            "schema": "click/v1", "event_id": event_id, "user_id": r.user_id, "item_id": r.item_id,
            "ts": r.ts, "label": int(r.rating >= 4), "rating": r.rating,
            "surface": "search" if query_id else "rec", "query_id": query_id, "position": None,
        })
    return events


def _summary(events: list[dict], items: dict[str, dict], rejected: list[source.Rejected]) -> dict:
    clicks = [e for e in events if e["schema"] == "click/v1"]
    return {
        "users": len({e["user_id"] for e in clicks}),
        "items": len(items),
        "clicked_items": len({e["item_id"] for e in clicks}),
        "clicks": len(clicks),
        "queries": len(events) - len(clicks),
        "positive_share": round(sum(e["label"] for e in clicks) / max(1, len(clicks)), 4),
        "rejected": len(rejected),
    }


def prepare(cfg: DataConfig, *, force: bool = False) -> Path:
    """Write events.jsonl / items.jsonl into `<cache_dir>/ml-100k/` (skipped when up to date)."""
    return prepare_with_summary(cfg, force=force)[0]


def prepare_with_summary(cfg: DataConfig, *, force: bool = False) -> tuple[Path, dict]:
    """`prepare`, also returning the summary counts (and whether the cache was reused)."""
    raw = source.locate_raw(cfg)
    out = Path(cfg.cache_dir) / "ml-100k"
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    fingerprint = _fingerprint(cfg, raw)
    if not force and manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:
            manifest = {}
        files_ok = all((out / n).is_file() and (out / n).stat().st_size == size
                       for n, size in manifest.get("sizes", {}).items())
        if manifest.get("fingerprint") == fingerprint and files_ok:
            return out, {**manifest["summary"], "cached": True}
    ratings, rejected = source.read_ratings(raw)
    items, rejected_items = source.read_items(raw)
    rejected += rejected_items
    if not ratings:
        raise source.DataError(f"{raw.ratings}: no ratings could be read ({len(rejected)} rows rejected)")
    events = build_events(ratings, items, cfg)
    _write(out / "events.jsonl", [_json(e) for e in events])
    _write(out / "items.jsonl", [_json(it) for it in items.values()])
    names = ["events.jsonl", "items.jsonl"]
    if rejected:
        _write(out / "rejected.jsonl", [_json(dataclasses.asdict(r)) for r in rejected])
        names.append("rejected.jsonl")
    else:
        (out / "rejected.jsonl").unlink(missing_ok=True)
    summary = _summary(events, items, rejected)
    manifest = {"format": FORMAT, "fingerprint": fingerprint, "source": str(raw.ratings.parent), "summary": summary,
                "sizes": {n: (out / n).stat().st_size for n in names}}
    _write(manifest_path, [json.dumps(manifest, indent=1)])
    return out, {**summary, "cached": False}


def _resolve(path: str | os.PathLike, name: str) -> Path:
    path = Path(path)
    return path / name if path.is_dir() else path


def load_events(path: str | os.PathLike) -> list[dict]:
    """All events of `events.jsonl` (or of the prepared folder holding it), in stream order."""
    with open(_resolve(path, "events.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_items(path: str | os.PathLike) -> dict[str, dict]:
    """`items.jsonl` (or the prepared folder holding it) keyed by item_id."""
    with open(_resolve(path, "items.jsonl"), encoding="utf-8") as f:
        return {rec["item_id"]: rec for rec in (json.loads(line) for line in f if line.strip())}
