"""`unirec.data.prepare`: the event stream a user (trainer, Kafka replay) relies on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from unirec.data import load_events, load_items, prepare
from unirec.data.config import QueryNoise
from unirec.data.prepare import prepare_with_summary
from unirec.data.queries import genre_word

CLICK_KEYS = {"schema": str, "event_id": str, "user_id": str, "item_id": str, "ts": int, "label": int,
              "rating": int, "surface": str, "query_id": (str, type(None)), "position": type(None)}
QUERY_KEYS = {"schema": str, "event_id": str, "user_id": str, "query_id": str, "text": str, "ts": int}

EXPECTED_ORDER = [("2", "2"), ("2", "1"), ("1", "3"), ("1", "1"), ("1", "2"), ("2", "3"), ("3", "1"), ("3", "4"), ("1", "5")]


def clicks(events):
    return [e for e in events if e["schema"] == "click/v1"]


def test_clicks_are_in_stable_time_order(hand_dir, make_cfg):
    events = load_events(prepare(make_cfg(hand_dir)))
    assert [(e["user_id"], e["item_id"]) for e in clicks(events)] == EXPECTED_ORDER
    assert [e["event_id"] for e in clicks(events)] == [f"c-{n}" for n in range(1, 10)]


def test_every_line_matches_its_schema(gen_dir, make_cfg):
    out = prepare(make_cfg(gen_dir))
    lines = (out / "events.jsonl").read_text().splitlines()
    assert len(lines) > 300
    for line in lines:
        e = json.loads(line)
        keys = CLICK_KEYS if e["schema"] == "click/v1" else QUERY_KEYS
        assert e["schema"] in ("click/v1", "query/v1")
        assert set(e) == set(keys), e
        for k, tp in keys.items():
            assert isinstance(e[k], tp) and not isinstance(e[k], bool), (k, e)
    for rec in load_items(out).values():
        assert set(rec) == {"item_id", "title", "year", "genres"}
        assert isinstance(rec["title"], str) and isinstance(rec["genres"], list)
        assert rec["year"] is None or isinstance(rec["year"], int)


def test_timestamps_never_decrease_and_labels_follow_ratings(gen_dir, make_cfg):
    events = load_events(prepare(make_cfg(gen_dir)))
    ts = [e["ts"] for e in events]
    assert ts == sorted(ts)
    assert all(e["label"] == int(e["rating"] >= 4) for e in clicks(events))
    assert {e["label"] for e in clicks(events)} == {0, 1}


def test_each_query_directly_precedes_its_search_click(gen_dir, make_cfg):
    events = load_events(prepare(make_cfg(gen_dir)))
    n_queries = 0
    for i, e in enumerate(events):
        if e["schema"] == "query/v1":
            n_queries += 1
            c = events[i + 1]
            assert c["schema"] == "click/v1" and c["surface"] == "search"
            assert (c["query_id"], c["user_id"], c["ts"]) == (e["query_id"], e["user_id"], e["ts"])
            assert e["event_id"] == e["query_id"] and e["text"].strip()
        elif e["surface"] == "search":
            assert events[i - 1]["schema"] == "query/v1" and events[i - 1]["query_id"] == e["query_id"]
        else:
            assert e["surface"] == "rec" and e["query_id"] is None
    query_ids = [e["query_id"] for e in events if e["schema"] == "query/v1"]
    assert query_ids == [f"q-{n}" for n in range(1, n_queries + 1)]


def test_query_share_is_exact_over_eligible_clicks(hand_dir, make_cfg):
    # 9 clicks; the click on item 4 (placeholder title, no genre) cannot get a query -> 8 eligible
    events = load_events(prepare(make_cfg(hand_dir, query_share=0.5)))
    searched = [e for e in clicks(events) if e["surface"] == "search"]
    assert len(searched) == 4
    assert "4" not in {e["item_id"] for e in searched}


def test_queries_come_from_the_clicked_item(gen_dir, make_cfg):
    noise = QueryNoise(wrong_genre_prob=0.0)  # every genre word is the item's own
    out = prepare(make_cfg(gen_dir, query_noise=noise))
    events, items = load_events(out), load_items(out)
    from unirec.data.queries import title_words
    for q, c in zip(events, events[1:]):
        if q["schema"] == "query/v1":
            item = items[c["item_id"]]
            allowed = set(title_words(item["title"])) | {genre_word(g) for g in item["genres"]}
            assert set(q["text"].split()) <= allowed, (q["text"], item)


def test_same_seed_gives_identical_files_and_another_seed_differs(gen_dir, make_cfg):
    a = prepare(make_cfg(gen_dir, cache="a"))
    b = prepare(make_cfg(gen_dir, cache="b"))
    c = prepare(make_cfg(gen_dir, cache="c", seed=99))
    assert (a / "events.jsonl").read_bytes() == (b / "events.jsonl").read_bytes()
    assert (a / "items.jsonl").read_bytes() == (b / "items.jsonl").read_bytes()
    assert (a / "events.jsonl").read_bytes() != (c / "events.jsonl").read_bytes()


def test_second_run_reuses_output_and_config_change_rebuilds(gen_dir, make_cfg):
    cfg = make_cfg(gen_dir)
    out, first = prepare_with_summary(cfg)
    mtime = (out / "events.jsonl").stat().st_mtime_ns
    _, second = prepare_with_summary(cfg)
    assert (first["cached"], second["cached"]) == (False, True)
    assert (out / "events.jsonl").stat().st_mtime_ns == mtime
    assert {k: v for k, v in second.items() if k != "cached"} == {k: v for k, v in first.items() if k != "cached"}
    _, third = prepare_with_summary(make_cfg(gen_dir, query_share=0.1))
    assert not third["cached"] and third["queries"] < first["queries"]
    (out / "events.jsonl").write_text("")  # a damaged output is rebuilt too
    _, fourth = prepare_with_summary(make_cfg(gen_dir, query_share=0.1))
    assert not fourth["cached"] and len(load_events(out)) > 0


def test_items_are_cleaned(hand_dir, make_cfg):
    items = load_items(prepare(make_cfg(hand_dir)))
    assert items["1"] == {"item_id": "1", "title": "Toy Story", "year": 1995, "genres": ["Animation", "Children's", "Comedy"]}
    assert items["4"] == {"item_id": "4", "title": "", "year": None, "genres": []}
    assert items["5"]["title"] == "Land Before Time III: The Time of the Great Giving" and items["5"]["year"] == 1995


def test_grouplens_files_give_the_same_stream(tmp_path, hand_dir, make_cfg, tiny):
    gl = tmp_path / "grouplens"
    gl.mkdir()
    (gl / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in tiny.hand_ratings))
    from unirec.data.source import GROUPLENS_GENRES
    rows = []
    for item_id, title, year, genres in tiny.hand_items:
        flags = "|".join("1" if g in genres.split() else "0" for g in GROUPLENS_GENRES)
        date = f"01-Jan-{year}" if year.isdigit() else ""
        title = title if item_id == "5" else (f"{title} ({year})" if year.isdigit() else title)
        rows.append(f"{item_id}|{title}|{date}||http://x|{flags}\n")
    (gl / "u.item").write_text("".join(rows), encoding="latin-1")
    a = prepare(make_cfg(hand_dir, cache="a"))
    b = prepare(make_cfg(gl, cache="b"))
    assert load_events(a) == load_events(b)
    assert load_items(a) == load_items(b)


def test_unparseable_rows_are_dead_lettered_not_dropped(tmp_path, make_cfg, tiny):
    ratings = [*tiny.hand_ratings]
    folder = tiny.write_atomic(tmp_path / "bad", ratings, tiny.hand_items)
    with open(folder / "ml-100k.inter", "a") as f:
        f.write("9\t1\tfive\t100\n")      # bad rating
        f.write("9\t1\t4\n")              # missing field
    out, summary = prepare_with_summary(make_cfg(folder))
    assert summary["clicks"] == len(ratings) and summary["rejected"] == 2
    rejected = [json.loads(x) for x in (out / "rejected.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejected] == [len(ratings) + 2, len(ratings) + 3]
    assert all(r["file"] == "ml-100k.inter" and r["reason"].startswith("bad_value") for r in rejected)


def test_missing_local_folder_names_the_remedy(tmp_path, make_cfg):
    from unirec.data import DataError
    with pytest.raises(DataError, match="data.path.*ml-100k.inter.*u.data"):
        prepare(make_cfg(tmp_path / "nowhere"))


def test_load_accepts_folder_or_file(hand_dir, make_cfg):
    out = prepare(make_cfg(hand_dir))
    assert load_events(out) == load_events(out / "events.jsonl")
    assert load_items(out) == load_items(Path(out) / "items.jsonl")
