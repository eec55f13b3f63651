"""`unirec.data.queries`: synthetic queries are clean, noisy as configured, and seeded."""
from __future__ import annotations

import random

import pytest

from unirec.data.config import QueryNoise
from unirec.data.queries import choose_clicks, genre_word, synthesize, title_words

GENRES = ["Action", "Children's", "Comedy", "Crime", "Drama", "Sci-Fi", "Thriller"]
SUSPECTS = {"item_id": "12", "title": "Usual Suspects, The", "year": 1995, "genres": ["Crime", "Thriller"]}
LONG = {"item_id": "9", "title": "Englishman Who Went Up a Hill, But Came Down a Mountain, The", "year": 1995,
        "genres": ["Comedy"]}


@pytest.mark.parametrize("title, words", [
    ("Usual Suspects, The", ["usual", "suspects"]),
    ("Shanghai Triad (Yao a yao yao dao waipo qiao)", ["shanghai", "triad"]),
    ("Land Before Time III: The Time of the Great Giving", ["land", "before", "time", "iii", "time", "great", "giving"]),
    ("Misérables, Les", ["miserables"]),
    ("2001: A Space Odyssey", ["2001", "space", "odyssey"]),
    ("It", ["it"]),  # only a stop word: kept rather than an empty query
    ("", []),
])
def test_title_words(title, words):
    assert title_words(title) == words


def test_genre_words_use_the_project_tokenizer():
    assert [genre_word(g) for g in ("Sci-Fi", "Children's", "Film-Noir")] == ["sci-fi", "childrens", "film-noir"]


def test_no_noise_gives_the_clean_title():
    noise = QueryNoise(word_drop=0.0, genre_prob=0.0, broad_prob=0.0)
    assert synthesize(SUSPECTS, GENRES, noise, random.Random(1)) == "usual suspects"


def test_word_drop_keeps_at_least_one_word_and_max_words_caps():
    noise = QueryNoise(word_drop=0.99, genre_prob=0.0, broad_prob=0.0)
    words = set(title_words(LONG["title"]))
    for seed in range(50):
        q = synthesize(LONG, GENRES, noise, random.Random(seed)).split()
        assert 1 <= len(q) and set(q) <= words
    capped = QueryNoise(word_drop=0.0, max_title_words=2, genre_prob=0.0, broad_prob=0.0)
    for seed in range(20):
        q = synthesize(LONG, GENRES, capped, random.Random(seed)).split()
        assert len(q) == 2 and " ".join(q) in " ".join(title_words(LONG["title"]))  # a contiguous run


def test_genre_word_is_right_or_wrong_as_configured():
    right = QueryNoise(word_drop=0.0, genre_prob=1.0, wrong_genre_prob=0.0, broad_prob=0.0)
    wrong = QueryNoise(word_drop=0.0, genre_prob=1.0, wrong_genre_prob=1.0, broad_prob=0.0)
    own = {genre_word(g) for g in SUSPECTS["genres"]}
    for seed in range(20):
        assert synthesize(SUSPECTS, GENRES, right, random.Random(seed)).split()[-1] in own
        last = synthesize(SUSPECTS, GENRES, wrong, random.Random(seed)).split()[-1]
        assert last not in own and last in {genre_word(g) for g in GENRES}


def test_wrong_genre_rate_is_roughly_the_configured_probability():
    noise = QueryNoise(word_drop=0.0, genre_prob=1.0, wrong_genre_prob=0.2, broad_prob=0.0)
    own = {genre_word(g) for g in SUSPECTS["genres"]}
    wrong = sum(synthesize(SUSPECTS, GENRES, noise, random.Random(s)).split()[-1] not in own for s in range(2000))
    assert 0.16 < wrong / 2000 < 0.24


def test_broad_queries_hold_only_genres():
    noise = QueryNoise(broad_prob=1.0, wrong_genre_prob=0.0)
    for seed in range(20):
        words = synthesize(SUSPECTS, GENRES, noise, random.Random(seed)).split()
        assert 1 <= len(words) <= 2 and set(words) <= {"crime", "thriller"}


def test_items_without_title_words_or_genres():
    genre_only = {"item_id": "1", "title": "", "year": None, "genres": ["Drama"]}
    assert synthesize(genre_only, GENRES, QueryNoise(), random.Random(0)) == "drama"
    assert synthesize({"item_id": "2", "title": "", "year": None, "genres": []}, GENRES, QueryNoise(), random.Random(0)) is None


def test_same_rng_seed_same_query():
    noise = QueryNoise()
    a = [synthesize(LONG, GENRES, noise, random.Random(f"2020/c-{i}")) for i in range(30)]
    b = [synthesize(LONG, GENRES, noise, random.Random(f"2020/c-{i}")) for i in range(30)]
    assert a == b and len(set(a)) > 5


def test_choose_clicks_is_exact_and_seeded():
    eligible = list(range(0, 1000, 3))
    a = choose_clicks(eligible, 0.25, seed=1)
    assert len(a) == round(0.25 * len(eligible)) and a <= set(eligible)
    assert a == choose_clicks(eligible, 0.25, seed=1) and a != choose_clicks(eligible, 0.25, seed=2)
    assert choose_clicks(eligible, 0.0, seed=1) == set() and choose_clicks(eligible, 1.0, seed=1) == set(eligible)
