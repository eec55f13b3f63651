"""`unirec.model.baselines` on constructed catalogues."""
from __future__ import annotations

import numpy as np
import pytest

from unirec.model.baselines import TextMatch, popularity

TEXTS = [None, "Star Wars Sci-Fi", "Star Trek Sci-Fi", "Toy Story Animation Comedy", "Wars of Roses Drama",
         "Star Kid Comedy"]


def test_popularity_counts_training_clicks():
    assert popularity([[1, 2, 2], [2, 3]], 5).tolist() == [0, 1, 3, 1, 0]
    assert popularity([1, 1, 4, 0], 5).tolist() == [0, 2, 0, 0, 1]  # padding index 0 never counts
    assert popularity([1, 1, 4, 0], 5, pad_index=None).tolist() == [1, 2, 0, 0, 1]


def test_the_best_matching_item_wins():
    tm = TextMatch(TEXTS)
    assert int(np.argmax(tm.scores("star wars"))) == 1
    assert int(np.argmax(tm.scores("toy story"))) == 3
    assert int(np.argmax(tm.scores("roses"))) == 4


def test_rare_words_weigh_more_than_common_ones():
    cos = TextMatch(TEXTS).cosine("star roses")  # "star" is in 3 items, "roses" in 1
    assert cos[4] > cos[1] > 0 and cos[3] == 0.0


def test_cosine_is_one_for_an_identical_text_and_zero_for_no_overlap():
    cos = TextMatch(TEXTS).cosine("Toy Story Animation Comedy")
    assert cos[3] == pytest.approx(1.0) and cos[1] == 0.0 and cos[0] == 0.0


def test_ties_are_broken_by_popularity():
    texts = [None, "Star Trek", "Star Trek", "Comedy", "Star Comedy"]
    pop = np.array([0, 5, 50, 0, 1], dtype=float)
    s = TextMatch(texts, pop).scores("star trek")  # items 1 and 2 match equally
    assert s[2] > s[1] > s[4] > s[3]
    s = TextMatch(texts, pop).scores("unknownword")  # no match at all: pure popularity
    assert np.argsort(-s, kind="stable")[:3].tolist() == [2, 1, 4]
    s = TextMatch(TEXTS, np.array([0, 0, 0, 0, 0, 1e9])).scores("star wars")
    assert s[1] > s[5]  # popularity never outweighs a better text match


def test_batch_scores_and_shape_check():
    tm = TextMatch(TEXTS)
    assert tm.scores_batch(["star", "comedy"]).shape == (2, len(TEXTS))
    with pytest.raises(ValueError):
        TextMatch(TEXTS, [1.0, 2.0])
