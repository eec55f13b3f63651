"""The one tokenizer for titles, genres and queries, and hashed word pieces.

Design choices (stdlib only, so data preparation, the streaming path and the model
all share exactly this code):

* `tokenize` folds accents (NFKD, combining marks dropped: "Misérables" ->
  "miserables"), lower-cases, deletes apostrophes ("Children's" -> "childrens",
  so a genre and a query typed without the apostrophe agree), and keeps runs of
  letters/digits joined by single hyphens as one token ("sci-fi", "film-noir").
  Everything else separates tokens.
* `hash_pieces` turns text into ids for an `nn.EmbeddingBag`-style lookup: every
  word, plus the character n-grams of each word wrapped in boundary markers
  ("<sci-fi>" -> "<sc", "sci", ..., "fi>"), the fastText recipe, so that a
  misspelt or partial word still shares most pieces with the right one. Pieces
  are hashed with blake2b (8-byte digest) - never Python's `hash()`, which is
  salted per process - into [1, n_buckets); 0 is reserved for padding. Word
  and n-gram pieces carry different prefixes so the word "sci" and the 3-gram
  "sci" do not collide by construction.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_APOSTROPHES = str.maketrans("", "", "'\u2019`")


def tokenize(text: str) -> list[str]:
    """Lower-cased, accent-folded word tokens of `text` (hyphenated words kept whole)."""
    folded = unicodedata.normalize("NFKD", text)
    folded = "".join(c for c in folded if not unicodedata.combining(c))
    return _TOKEN.findall(folded.lower().translate(_APOSTROPHES))


def stable_hash(piece: str) -> int:
    """A process-independent 64-bit hash of `piece`."""
    return int.from_bytes(hashlib.blake2b(piece.encode("utf-8"), digest_size=8).digest(), "little")


def word_pieces(word: str, ngram: int = 3) -> list[str]:
    """The word itself ("w:" prefix) and its boundary-marked character n-grams ("g:")."""
    pieces = [f"w:{word}"]
    if ngram > 0:
        marked = f"<{word}>"
        pieces.extend(f"g:{marked[i:i + ngram]}" for i in range(max(1, len(marked) - ngram + 1)))
    return pieces


def hash_pieces(text: str, n_buckets: int, *, ngram: int = 3, max_pieces: int | None = None) -> list[int]:
    """Hashed word pieces of `text` in [1, n_buckets) (0 = padding), in text order.

    `ngram=0` gives words only. `max_pieces` truncates the list (keeping whole
    words first is not attempted: pieces are in word order, so truncation drops
    the end of the text).
    """
    if n_buckets < 2:
        raise ValueError(f"n_buckets must be >= 2 (bucket 0 is padding), got {n_buckets}")
    ids = [1 + stable_hash(p) % (n_buckets - 1) for w in tokenize(text) for p in word_pieces(w, ngram)]
    return ids if max_pieces is None else ids[:max_pieces]
