"""`unirec.model.text`: the shared tokenizer and hashed word pieces."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from unirec.model.text import hash_pieces, tokenize, word_pieces


@pytest.mark.parametrize("text, tokens", [
    ("Star Wars (1977)", ["star", "wars", "1977"]),
    ("Sci-Fi Thriller", ["sci-fi", "thriller"]),
    ("Children's", ["childrens"]),
    ("Misérables, Les", ["miserables", "les"]),
    ("Face/Off", ["face", "off"]),
    ("  -- ", []),
    ("Dr. Strangelove -or- How I Learned", ["dr", "strangelove", "or", "how", "i", "learned"]),
])
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens


def test_word_pieces_are_word_plus_marked_trigrams():
    assert word_pieces("sci") == ["w:sci", "g:<sc", "g:sci", "g:ci>"]
    assert word_pieces("a") == ["w:a", "g:<a>"]
    assert word_pieces("abc", ngram=0) == ["w:abc"]


def test_hash_pieces_range_order_and_padding():
    ids = hash_pieces("Star Wars sci-fi", n_buckets=1000)
    assert len(ids) == sum(len(word_pieces(w)) for w in ("star", "wars", "sci-fi"))
    assert all(1 <= i < 1000 for i in ids)
    assert hash_pieces("", 1000) == []
    assert hash_pieces("Star Wars", 1000, max_pieces=3) == ids[:3]
    assert hash_pieces("STAR  wars!", 1000) == hash_pieces("star wars", 1000)
    with pytest.raises(ValueError):
        hash_pieces("x", 1)


def test_a_typo_shares_most_pieces():
    right, typo, other = (set(hash_pieces(t, 1 << 20)) for t in ("terminator", "terminatr", "casablanca"))
    assert len(right & typo) >= len(right) // 2
    assert len(right & other) <= 1


def test_hashes_do_not_depend_on_the_process_hash_seed():
    code = "from unirec.model.text import hash_pieces; print(hash_pieces('star wars sci-fi', 4096))"
    outs = {
        subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, text=True, check=True).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1 and outs.pop().strip() == str(hash_pieces("star wars sci-fi", 4096))
