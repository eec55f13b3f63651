"""`unirec.model.batching.context_batch`: the serving path's column copy builds the very tensors
the token-list definition (`_tokens` + `collate`) builds, whatever the history and the flags."""
import numpy as np
import pytest
import torch

from unirec.model.batching import ITEM, PAD, History, _tokens, collate, context_batch


def _random_history(rng: np.random.Generator, n: int) -> History:
    surfaces = rng.integers(0, 2, n)
    queries = [list(rng.integers(1, 50, rng.integers(1, 5))) if s else None for s in surfaces]
    if n:
        queries[rng.integers(0, n)] = []       # a search whose text hashed to no piece
    return History(rng.integers(1, 30, n), rng.integers(0, 2, n), 10**9 + np.cumsum(rng.integers(1, 900, n)),
                   surfaces, queries)


def _reference(histories, max_len, **flags):
    return collate([_tokens(t, len(t), flags["use_queries"], flags["use_feedback"],
                            feedback_tokens=flags["feedback_tokens"])
                    for t in (h.slice(max(0, len(h) - max_len), len(h)) for h in histories)])


@pytest.mark.parametrize("use_queries", [True, False])
@pytest.mark.parametrize("use_feedback", [True, False])
@pytest.mark.parametrize("feedback_tokens", [False, True])
def test_context_batch_equals_token_lists(use_queries, use_feedback, feedback_tokens):
    rng = np.random.default_rng(5)
    flags = {"use_queries": use_queries, "use_feedback": use_feedback, "feedback_tokens": feedback_tokens}
    for sizes in ([7], [0], [3, 12, 0, 1], [25, 9]):         # empty rows, rows cut to max_len, ragged batches
        hs = [_random_history(rng, n) for n in sizes]
        got, want = context_batch(hs, 10, **flags), _reference(hs, 10, **flags)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (k, sizes)


def test_context_batch_keeps_the_window_and_pads_right():
    h = History(np.array([5, 6, 7]), np.array([1, 0, 1]), np.array([100, 200, 300]), np.array([0, 1, 0]),
                [None, [4, 2], None])
    b = context_batch([h, h.slice(0, 1)], max_len=2)
    assert b["item"].tolist() == [[6, 7], [5, 0]]            # the last max_len events, padding after
    assert b["type"].tolist() == [[ITEM, ITEM], [ITEM, PAD]]
    assert b["prev_label"].tolist() == [[-1, 0], [-1, -1]]   # no label from before the window
    assert b["ts"].tolist() == [[200, 300], [100, 100]]      # padding keeps the last timestamp
    assert b["query"][0, 0].tolist() == [4, 2] and b["length"].tolist() == [2, 1]
