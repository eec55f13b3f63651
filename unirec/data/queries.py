"""Synthetic search queries for MovieLens-100k clicks.

MovieLens has no search log, so we synthesise one, deterministically, from the
clicked item's own text: the query is what a user who already knows roughly
what they want might type, or, for browse queries, the genre they are after.

Which clicks: among the clicks whose item has any query words (a title word or
a genre), exactly `round(query_share * eligible)` are chosen by
`random.Random(seed).sample`, so the share is exact and the choice depends only
on the seed and the click stream. Those clicks become surface "search" and are
preceded in the stream by their query event.

What a query says (`synthesize`):

1. Title words: the title (years and parenthesised alternate titles such as
   "(Se7en)" or "(Yao a yao yao dao waipo qiao)" removed; a trailing article
   moved back to the front, "Usual Suspects, The" -> "The Usual Suspects";
   placeholder titles are empty) is run through the project tokenizer
   (`unirec.model.text.tokenize`: lower-case, punctuation gone, accents folded),
   and stop words (English function words and the articles of the titles'
   other languages: "the", "of", "la", "il", ...) are dropped. If that leaves
   nothing ("It"), the stop words are kept.
2. Noise on the title words: each word is dropped with probability
   `word_drop`, keeping at least one (a random survivor if all were dropped);
   then at most `max_title_words` are kept (a random contiguous run, in title
   order).
3. Genre: with probability `genre_prob` one genre word is appended: one of the
   item's genres, except that with probability `wrong_genre_prob` it is a
   genre the item does not have (always, for an item without genres). A genre
   word is the tokenized genre name ("Sci-Fi" -> "sci-fi", "Children's" ->
   "childrens").
4. Broad queries: with probability `broad_prob` (items with a genre only) the
   query is instead one or two of the item's genres and no title word
   ("comedy romance"), the last one wrong with probability `wrong_genre_prob`.
   Why: ml-100k titles are short and nearly unique, so any title word plus a
   popularity tie-break finds the clicked item in the top 10 about 99% of the
   time (measured with `TextMatch`); a search log also holds browse queries,
   where only the user's history can tell which comedy they want. Set
   `broad_prob: 0` for title-word queries only.
5. An item with no title words gets a genre-only query (always its own
   genre, no noise); an item with neither is not eligible.

Every random draw for one query comes from `random.Random(f"{seed}/{event_id}")`
(a str seed is hashed with SHA-512 by `random`, not Python's salted `hash()`),
so a click's query does not change when other clicks get or lose queries and
the same seed gives a byte-identical stream.
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

from unirec.data.config import QueryNoise
from unirec.model.text import tokenize

STOP_WORDS = frozenset(
    # English function words
    "a an and are as at be but by for from in into is it its of on or so than that the their this "
    "to too was were what when where which who whom why will with".split()
    # articles/prepositions of the non-English titles in ml-100k
    + "l la le les il lo los las el der die das det den de del des du da di dei von en et y".split()
)
_ARTICLES = r"(?:The|A|An|L'|La|Le|Les|Il|Lo|Los|Las|El|Der|Die|Das|Det|Den|O)"
_TRAILING_ARTICLE = re.compile(rf"^(.*?),\s*({_ARTICLES})$")
_PARENS = re.compile(r"\s*\([^)]*\)")


def title_words(title: str) -> list[str]:
    """The searchable words of a title: cleaned, tokenized, stop words dropped."""
    text = _PARENS.sub("", title).strip() or title  # alternate titles and years in parentheses
    m = _TRAILING_ARTICLE.match(text)
    if m:
        text = f"{m.group(2)} {m.group(1)}"
    words = tokenize(text)
    content = [w for w in words if w not in STOP_WORDS]  # "2001" in "2001: A Space Odyssey" is a title word
    return content or words


def genre_word(genre: str) -> str:
    """The query word for a genre name ("Sci-Fi" -> "sci-fi")."""
    return " ".join(tokenize(genre))


def _genre(own: Sequence[str], others: Sequence[str], wrong_prob: float, rng: random.Random) -> str:
    """One genre word: the item's own, or (with `wrong_prob`, or if it has none) a wrong one."""
    wrong = bool(others) and (not own or rng.random() < wrong_prob)
    return genre_word(rng.choice(others if wrong else own))


def synthesize(item: dict, all_genres: Sequence[str], noise: QueryNoise, rng: random.Random) -> str | None:
    """A noisy query for `item` (items.jsonl record), or None if the item has no words at all."""
    words = title_words(item.get("title") or "")
    own = [g for g in item.get("genres", ()) if genre_word(g)]
    others = [g for g in all_genres if g not in own and genre_word(g)]
    if not words and not own:
        return None
    if not words:  # nothing but genres to say: the item's own genre, no noise
        return genre_word(rng.choice(own))
    if own and rng.random() < noise.broad_prob:  # a browse query: one or two genres, no title
        picked = rng.sample(own, min(len(own), rng.choice((1, 2))))
        if others and rng.random() < noise.wrong_genre_prob:
            picked[-1] = rng.choice(others)
        return " ".join(genre_word(g) for g in picked)
    kept = [w for w in words if rng.random() >= noise.word_drop]
    if not kept:
        kept = [rng.choice(words)]
    if len(kept) > noise.max_title_words:
        start = rng.randrange(len(kept) - noise.max_title_words + 1)
        kept = kept[start:start + noise.max_title_words]
    if rng.random() < noise.genre_prob:
        kept.append(_genre(own, others, noise.wrong_genre_prob, rng))
    return " ".join(kept)


def choose_clicks(eligible: Sequence[int], share: float, seed: int) -> set[int]:
    """Exactly round(share * len(eligible)) of `eligible` (click positions), seeded."""
    k = round(share * len(eligible))
    return set(random.Random(seed).sample(list(eligible), k))
