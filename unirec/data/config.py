"""The `data:` section of pipeline.yaml."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class QueryNoise:
    """How synthetic queries deviate from the clicked item's clean title + genre."""

    word_drop: float = 0.3          # each title word is dropped with this probability (>= 1 word kept)
    max_title_words: int = 4        # then at most this many title words, in title order (people type short queries)
    genre_prob: float = 0.5         # probability that a genre word is appended
    wrong_genre_prob: float = 0.15  # given a genre word, probability that it is a genre the item does NOT have
    broad_prob: float = 0.3         # probability of a browse query: 1-2 genre words, no title word

    def __post_init__(self) -> None:
        for name in ("word_drop", "genre_prob", "wrong_genre_prob", "broad_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"query_noise.{name}: must be in [0, 1], got {value}")
        if self.word_drop >= 1.0:
            raise ValueError("query_noise.word_drop: must be < 1 (a query keeps at least one title word)")
        if self.max_title_words < 1:
            raise ValueError(f"query_noise.max_title_words: must be >= 1, got {self.max_title_words}")


@dataclass(frozen=True)
class DataConfig:
    cache_dir: str = ".cache/unirec"   # wheel, raw files and the prepared stream (relative to the working dir)
    path: str | None = None            # a local ml-100k folder (ml-100k.inter/.item or u.data/u.item) instead of the wheel
    recbole_version: str = "1.2.1"     # the RecBole wheel that ships ml-100k (`pip download --no-deps`)
    query_share: float = 0.25          # share of clicks that get a synthetic query event (and become surface "search")
    seed: int = 2020                   # seeds which clicks get queries and each query's noise
    query_noise: QueryNoise = field(default_factory=QueryNoise)

    def __post_init__(self) -> None:
        if not 0.0 <= self.query_share <= 1.0:
            raise ValueError(f"query_share: must be in [0, 1], got {self.query_share}")
