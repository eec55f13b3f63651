"""Tiny MovieLens-like datasets written to tmp_path in RecBole atomic or GroupLens format."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from unirec.data.config import DataConfig

INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"

# (user, item, rating, ts) in file order. Ties on purpose: u1's (i1, ts 100) and (i2, ts 100)
# must keep file order; (i3, ts 90) comes later in the file but earlier in time.
HAND_RATINGS = [
    ("1", "1", 5, 100),
    ("2", "2", 3, 50),
    ("1", "2", 4, 100),
    ("1", "3", 2, 90),
    ("2", "3", 4, 200),
    ("3", "1", 1, 300),
    ("2", "1", 5, 60),
    ("1", "5", 4, 400),
    ("3", "4", 3, 300),
]
HAND_ITEMS = [
    ("1", "Toy Story", "1995", "Animation Children's Comedy"),
    ("2", "Usual Suspects, The", "1995", "Crime Thriller"),
    ("3", "Shanghai Triad (Yao a yao yao dao waipo qiao)", "1995", "Drama"),
    ("4", "unkonwn", "unkonwn", "unknown"),
    ("5", "Land Before Time III: The Time of the Great Giving (1995)", "V", "Animation Children's"),
]
GENRES = ("Action", "Comedy", "Drama", "Sci-Fi", "Thriller", "Romance", "Children's", "Film-Noir")
WORDS = ("star", "wars", "day", "night", "return", "king", "lost", "world", "love", "city", "blue", "dead")


def write_atomic(folder: Path, ratings, items) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ml-100k.inter").write_text(
        "\n".join([INTER_HEADER] + [f"{u}\t{i}\t{r}\t{t}" for u, i, r, t in ratings]) + "\n")
    (folder / "ml-100k.item").write_text(
        "\n".join([ITEM_HEADER] + ["\t".join(row) for row in items]) + "\n", encoding="utf-8")
    return folder


def generated(n_users: int = 12, n_items: int = 30, n_ratings: int = 300, seed: int = 7):
    """A random dataset with many timestamp ties (ts drawn from a small range)."""
    rng = random.Random(seed)
    items = []
    for i in range(1, n_items + 1):
        title = " ".join(rng.sample(WORDS, rng.randint(1, 3))).title()
        if rng.random() < 0.3:
            title += ", The"
        items.append((str(i), title, str(1950 + i), " ".join(rng.sample(GENRES, rng.randint(1, 3)))))
    ratings = [(str(rng.randint(1, n_users)), str(rng.randint(1, n_items)), rng.randint(1, 5),
                880000000 + rng.randint(0, 60)) for _ in range(n_ratings)]
    return ratings, items


@pytest.fixture
def hand_dir(tmp_path: Path) -> Path:
    return write_atomic(tmp_path / "hand", HAND_RATINGS, HAND_ITEMS)


@pytest.fixture
def gen_dir(tmp_path: Path) -> Path:
    return write_atomic(tmp_path / "gen", *generated())


@pytest.fixture
def make_cfg(tmp_path: Path):
    """DataConfig(cache_dir=<tmp>/cache, path=<folder>, **overrides)."""
    def make(path: Path, cache: str = "cache", **kw) -> DataConfig:
        return DataConfig(cache_dir=str(tmp_path / cache), path=str(path), **kw)
    return make


@pytest.fixture
def tiny():
    """The dataset builders, for tests that need a variant."""
    class Tiny:
        hand_ratings, hand_items = HAND_RATINGS, HAND_ITEMS
        write_atomic = staticmethod(write_atomic)
        generated = staticmethod(generated)
        inter_header, item_header = INTER_HEADER, ITEM_HEADER
    return Tiny
