"""The unified model: token layout, public calls, candidate scoring."""
import numpy as np
import torch

from unirec.model.batching import FEEDBACK, ITEM, History, context_batch, train_batches, windows
from unirec.model.config import ModelConfig
from unirec.model.model import UnifiedRecommender
from unirec.model.vocab import Vocab


def _vocab(n=20):
    items = {str(i): {"title": f"film number {i}", "genres": ["Drama" if i % 2 else "Comedy"]} for i in range(1, n + 1)}
    return Vocab.build(items, n_buckets=300, ngram=3, max_pieces=12)


def _model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=2, n_buckets=300, max_len=30, dropout=0.0, **kw)
    return UnifiedRecommender(cfg, _vocab()).eval()


def _hist(items, labels=None, queries=None):
    n = len(items)
    labels = labels or [1] * n
    queries = queries or [None] * n
    return History(np.array(items), np.array(labels), 10**9 + 60 * np.arange(n),
                   np.array([q is not None for q in queries], dtype=np.int64), queries)


def test_token_layout_and_targets():
    h = _hist([3, 4, 5], labels=[1, 0, 1], queries=[None, [7, 8], None])
    b = next(train_batches([h], 30, 1))
    assert b["type"][0].tolist() == [ITEM, ITEM, ITEM]          # one token per event, no query token
    # next-item targets sit on the item tokens; a search click's token holds its query and its target
    assert b["rec_target"][0].tolist() == [4, 5, 0]
    assert b["search_target"][0].tolist() == [0, 4, 0]
    assert b["query"][0, 1].tolist() == [7, 8] and (b["query"][0, [0, 2]] == 0).all()
    assert b["rank_label"][0].tolist() == [1, 0, 1]
    # each event's token carries the previous event's label, never its own
    assert b["prev_label"][0].tolist() == [-1, 1, 0]


def test_token_layout_with_feedback_tokens():
    h = _hist([3, 4, 5], labels=[1, 0, 1], queries=[None, [7, 8], None])
    b = next(train_batches([h], 30, 1, feedback_tokens=True))
    assert b["type"][0].tolist() == [ITEM, FEEDBACK, ITEM, FEEDBACK, ITEM, FEEDBACK]
    assert (b["prev_label"] == -1).all()
    # next-item targets sit on the feedback tokens; the search click's token holds its target
    assert b["rec_target"][0].tolist() == [0, 4, 0, 5, 0, 0]
    assert b["search_target"][0].tolist() == [0, 0, 4, 0, 0, 0]
    assert b["rank_label"][0].tolist() == [1, -1, 0, -1, 1, -1]
    # tokens of one event share its timestamp
    assert b["ts"][0, 2] == b["ts"][0, 3]


def test_an_events_label_reaches_later_events_only():
    """The ranker at item t must not see label t (it is the target); the next event must see it."""
    m = _model()
    a = _hist([3, 4, 5, 6], labels=[1, 1, 1, 1], queries=[None, None, [7, 8], None])
    b = _hist([3, 4, 5, 6], labels=[1, 0, 1, 1], queries=[None, None, [7, 8], None])
    with torch.no_grad():
        ha, _ = m(context_batch([a], 30))
        hb, _ = m(context_batch([b], 30))
    assert torch.allclose(ha[0, :2], hb[0, :2], atol=1e-6)                  # events 0, 1
    assert not torch.allclose(ha[0, 2], hb[0, 2]) and not torch.allclose(ha[0, 3], hb[0, 3])   # events 2, 3


def test_windows_cover_every_event_once():
    for n in (1, 7, 30, 31, 100, 257):
        covered = []
        for s, e, lf in windows(n, 30):
            assert e - s <= 30 and s <= lf < e
            covered += list(range(lf, e))
        assert sorted(covered) == list(range(n))


def test_vocab_maps_ids_and_reserves_row_zero():
    v = _vocab()
    assert v.row("1") == 1 and v.row("20") == 20 and v.row("nope") == 0
    assert v.item_id(v.row("7")) == "7"
    assert (v.pieces[0] == 0).all() and (v.pieces[1] > 0).any()


def test_public_calls_shapes_and_padding_row_never_recommended():
    m = _model()
    hs = [_hist([1, 2, 3]), _hist([4, 5])]
    scores, rows = m.recommend(hs, 5)
    assert rows.shape == (2, 5) and (rows > 0).all()
    assert m.user_state(hs).shape == (2, 32)
    assert m.item_embeddings().shape == (21, 32)
    s_scores, s_rows = m.search(hs, [[1, 2], [3]], 5)
    assert s_rows.shape == (2, 5) and not torch.equal(s_scores, scores)
    p = m.rank(hs, torch.tensor([[1, 2, 3], [6, 7, 8]]))
    assert p.shape == (2, 3) and ((p > 0) & (p < 1)).all()


def test_rank_candidates_do_not_see_each_other():
    m = _model()
    hs = [_hist([1, 2, 3])]
    alone = m.rank(hs, torch.tensor([[7]]))[0, 0]
    together = m.rank(hs, torch.tensor([[9, 7, 11, 12]]))[0, 1]
    assert torch.allclose(alone, together, atol=1e-6)


def test_right_padding_does_not_change_outputs():
    m = _model()
    short, long = _hist([1, 2]), _hist([3, 4, 5, 6, 7, 8])
    together = m.user_state([short, long])
    assert torch.allclose(together[0], m.user_state([short])[0], atol=1e-5)


def _trained_fusion(m):
    """Give the (zero-ish at init) fusion MLP visible weights, so tests can see what it reads."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in list(m.query_fuse.parameters()) + [m.start_state, m.query_ln.bias]:
            p.normal_(0, 0.5)
    return m


def test_query_text_changes_the_search_state_only_through_the_query():
    m = _trained_fusion(_model())
    hs = [_hist([1, 2, 3])]
    a = m.user_state(hs, [[5, 6]])
    b = m.user_state(hs, [[9]])
    assert not torch.allclose(a, b)
    assert torch.allclose(m.user_state(hs, [[5, 6]]), a)
    assert not torch.allclose(m.user_state(hs, [[5, 6]]), m.user_state(hs))    # search != rec state


def test_search_state_reads_the_query_and_earlier_events_only():
    """Training's search vector for a click = the served search state for the history before it
    with its query; the clicked item, its label and later events do not change it."""
    m = _trained_fusion(_model())
    q = [7, 8, 9]

    def search_vec(items, labels=None):
        b = context_batch([_hist(items, labels, queries=[None, None, q, None])], 30)
        h, _ = m(b)
        return m.search_vectors(h, b, torch.tensor([2]))[0]                  # the click at event 2

    with torch.no_grad():
        ref = search_vec([1, 2, 3, 4])
        assert torch.allclose(ref, search_vec([1, 2, 11, 4], [1, 1, 0, 1]), atol=1e-6)   # own item, own label
        assert torch.allclose(ref, search_vec([1, 2, 3, 12]), atol=1e-6)     # a later event
        assert not torch.allclose(ref, search_vec([5, 2, 3, 4]))              # an earlier event
    served = m.user_state([_hist([1, 2])], [q])[0]
    assert torch.allclose(ref, served, atol=1e-5)


def test_a_search_click_passes_its_query_to_later_events_not_to_earlier_ones():
    m = _model()
    a = _hist([1, 2, 3, 4], queries=[None, None, [7, 8], None])
    b = _hist([1, 2, 3, 4], queries=[None, None, [9, 10], None])
    with torch.no_grad():
        ha, _ = m(context_batch([a], 30))
        hb, _ = m(context_batch([b], 30))
    assert torch.allclose(ha[0, :2], hb[0, :2], atol=1e-6)
    assert not torch.allclose(ha[0, 3], hb[0, 3])
    nq = _model(use_queries=False)                                          # unified_no_query: no query input
    with torch.no_grad():
        assert torch.allclose(nq(context_batch([a], 30, use_queries=False))[0],
                              nq(context_batch([b], 30, use_queries=False))[0])


def test_search_at_the_start_of_a_history_uses_the_learned_start_state():
    m = _trained_fusion(_model())
    h = _hist([3, 4], queries=[[7, 8], None])
    b = context_batch([h], 30)
    with torch.no_grad():
        hs, _ = m(b)
        got = m.search_vectors(hs, b, torch.tensor([0]))[0]
    empty = History(*(np.zeros(0, dtype=np.int64) for _ in range(4)), [])
    assert torch.allclose(got, m.user_state([empty], [[7, 8]])[0], atol=1e-6)
    with torch.no_grad():
        m.start_state.add_(1.0)
    assert not torch.allclose(got, m.user_state([empty], [[7, 8]])[0])


def test_without_feedback_tokens_rec_targets_sit_on_items():
    h = _hist([3, 4, 5])
    b = next(train_batches([h], 30, 1, use_feedback=False, use_queries=False))
    assert b["type"][0].tolist() == [ITEM, ITEM, ITEM]
    assert b["rec_target"][0].tolist() == [4, 5, 0]


def test_lexical_channel_finds_the_item_whose_title_was_typed():
    from unirec.model.text import hash_pieces
    titles = ["alpha storm", "brave river", "crimson moon", "distant echo", "emerald tide", "frozen lake"]
    items = {str(i + 1): {"title": t, "genres": ["Drama"]} for i, t in enumerate(titles)}
    v = Vocab.build(items, n_buckets=500, ngram=3, max_pieces=16)
    torch.manual_seed(0)
    m = UnifiedRecommender(ModelConfig(d_model=32, n_heads=2, n_buckets=500, dropout=0.0), v).eval()
    with torch.no_grad():   # silence the (untrained, random) dense part: only the lexical channel speaks
        m.retrieval_proj.weight.zero_()
        m.retrieval_proj.bias.zero_()
    hs = [_hist([1, 2])]
    for i, t in enumerate(titles):
        q = hash_pieces(t.split()[1], 500, ngram=3)        # one title word
        _, rows = m.search(hs, [q], 1)
        assert rows[0, 0].item() == i + 1
    dense = UnifiedRecommender(ModelConfig(d_model=32, n_heads=2, n_buckets=500, dropout=0.0,
                                           use_lexical=False), v).eval()
    dense.load_state_dict(m.state_dict())
    q = [hash_pieces("crimson", 500, ngram=3)]
    assert not torch.allclose(dense.search_scores(hs, q), m.search_scores(hs, q))


def test_lexical_index_rows_are_unit_idf_vectors():
    from unirec.model.sparse import csr, lexical_index
    pieces = torch.tensor([[0, 0], [1, 2], [2, 2], [3, 0]])
    idf, lex = lexical_index(pieces, 5)
    dense = csr(*lex).to_dense()
    assert dense[0].abs().sum() == 0
    assert torch.allclose(dense[1:].norm(dim=1), torch.ones(3))
    assert idf[2] < idf[1] == idf[3]          # piece 2 is in two items, 1 and 3 in one


def test_item_vectors_are_id_plus_mean_text_pieces_with_matching_gradients():
    """The sparse-matrix fast path equals the plain gather-mask-mean, forward and backward."""
    m = _model().train()
    p = m.item_pieces
    mask = (p > 0).unsqueeze(-1).float()
    plain = m.item_emb.weight + (m.piece_emb(p) * mask).sum(1) / mask.sum(1).clamp(min=1)
    w = torch.randn_like(plain)
    (g_plain,) = torch.autograd.grad((plain * w).sum(), m.piece_emb.weight)
    fast = m.item_vectors()
    (g_fast,) = torch.autograd.grad((fast * w).sum(), m.piece_emb.weight)
    assert torch.allclose(fast, plain, atol=1e-6) and torch.allclose(g_fast, g_plain, atol=1e-5)
    assert torch.equal(fast[0], m.item_emb.weight[0])   # the padding row has no text


def test_lexical_scores_are_scaled_cosines_of_idf_weighted_piece_bags():
    """The CSR fast path against the plain dense cosine, including repeated and padding pieces."""
    from unirec.model.sparse import csr, lexical_index
    m = _model()
    pieces = torch.tensor([[5, 5, 17, 0], [m.item_pieces[3, 0].item(), 0, 0, 0], [0, 0, 0, 0]])
    idf, lex = lexical_index(m.item_pieces, 300)
    q = torch.zeros(3, 300)
    for r, row in enumerate(pieces.tolist()):
        for p in row:
            q[r, p] += float(p > 0)
    q = q * idf
    q = q / q.norm(dim=1, keepdim=True).clamp(min=1e-12)
    expected = m.lex_scale.detach() * q @ csr(*lex).to_dense().T
    got = m.lexical_scores(pieces)
    assert torch.allclose(got, expected, atol=1e-5) and (got[1] > 0).any() and (got[2] == 0).all()
    got.sum().backward()
    assert m.lex_scale.grad is not None   # the learned weight still trains


def test_repeat_scores_cover_exactly_the_items_the_state_has_seen():
    m = _model()
    with torch.no_grad():
        m.repeat_logit.fill_(-0.7)
    from unirec.model.batching import _tokens, collate
    b = collate([_tokens(_hist([3, 4, 5]), 0, True, True), _tokens(_hist([6, 7]), 0, True, True)])
    T = b["type"].shape[1]
    # row 0: state after event 1 (item token 1) has seen items 3 and 4, not 5; row 1 sees 6 only
    flat = torch.tensor([0 * T + 1, 1 * T + 0])
    s = m.repeat_scores(b, flat)
    w = -0.7 / m.cfg.temperature
    assert s.shape == (2, 21)
    assert torch.nonzero(s[0]).squeeze(1).tolist() == [3, 4] and torch.allclose(s[0, [3, 4]], torch.tensor([w, w]))
    assert torch.nonzero(s[1]).squeeze(1).tolist() == [6]


def _short_context_model(**kw):
    torch.manual_seed(0)
    return UnifiedRecommender(ModelConfig(d_model=32, n_heads=2, n_buckets=300, max_len=2, dropout=0.0, **kw),
                              _vocab()).eval()


def test_recommend_scores_add_the_repeat_logit_on_the_context_window_only():
    m = _short_context_model()
    with torch.no_grad():
        m.repeat_logit.fill_(-1.0)
    h = _hist([1, 2, 3])                                   # item 1 is outside the 2-event window
    got = m.recommend_scores([h])
    plain = m.retrieval_scores(m.user_state([h]))
    diff = got - plain
    assert torch.allclose(diff[0, [2, 3]], torch.full((2,), -1.0 / m.cfg.temperature))
    assert diff[0, 1] == 0 and (diff[0, 4:] == 0).all()
    off = _short_context_model(repeat_bias=False)
    off.load_state_dict(m.state_dict())
    assert torch.allclose(off.recommend_scores([h]), off.retrieval_scores(off.user_state([h])))


def test_all_targets_trains_every_event_of_every_window():
    h = _hist(list(range(1, 21)))
    once = list(train_batches([h], 10, 8))
    every = list(train_batches([h], 10, 8, all_targets=True))
    n_once = sum(int((b["rank_label"] >= 0).sum()) for b in once)
    n_every = sum(int((b["rank_label"] >= 0).sum()) for b in every)
    assert n_once == 20                                   # each event once
    assert n_every == sum(e - s for s, e, _ in windows(20, 10)) > 20


def _version_arrays(mc):
    """A model on a small item table and the arrays a registry version holds for it."""
    from unirec.model.vocab import ItemTable
    torch.manual_seed(0)
    table = ItemTable(8, mc.max_item_pieces)
    table.assign(["a", "b", "c"], [1, 2, 3])
    m = UnifiedRecommender(mc, table)
    with torch.no_grad():
        m.repeat_logit.fill_(-2.0)
    weights = {k: v.detach().clone() for k, v in m.state_dict().items()} | {"item_pieces": table.pieces.clone()}
    return m, table.live_ids(), weights, table.arrays()


def test_version_saved_before_the_repeat_logit_loads_with_it_at_zero(caplog):
    import logging

    import pytest

    from unirec.model.snapshot import model_from_arrays
    mc = ModelConfig(d_model=32, n_heads=2, n_buckets=300, max_len=30)
    m, ids, weights, arrays = _version_arrays(mc)
    old = {k: v for k, v in weights.items() if k != "repeat_logit"}
    with caplog.at_level(logging.INFO, logger="unirec.model.snapshot"):
        got, _ = model_from_arrays(mc, ids, old, arrays)
    assert got.repeat_logit.item() == 0.0 and got.repeat_logit.requires_grad    # as a new model's, still learns
    assert "repeat_logit" in caplog.text
    assert torch.equal(got.blocks[0].attn.qkv.weight, m.blocks[0].attn.qkv.weight)
    full, _ = model_from_arrays(mc, ids, weights, arrays)                        # a current version: as saved
    assert full.repeat_logit.item() == -2.0
    broken = {k: v for k, v in weights.items() if k != "rank_head.0.weight"}     # any other gap is an error
    with pytest.raises(RuntimeError, match="rank_head.0.weight"):
        model_from_arrays(mc, ids, broken, arrays)


def test_version_trained_with_query_tokens_is_refused_with_a_clear_error():
    import pytest

    from unirec.model.snapshot import model_from_arrays
    mc = ModelConfig(d_model=32, n_heads=2, n_buckets=300, max_len=30)
    _, ids, weights, arrays = _version_arrays(mc)
    old = {k: v for k, v in weights.items() if not k.startswith(("query_fuse.", "start_state"))}
    with pytest.raises(ValueError, match="query tokens"):
        model_from_arrays(mc, ids, old, arrays)
    nq = ModelConfig(d_model=32, n_heads=2, n_buckets=300, max_len=30, use_queries=False)
    _, ids, weights, arrays = _version_arrays(nq)                  # without queries nothing changed
    model_from_arrays(nq, ids, weights, arrays)


def test_version_config_without_feedback_tokens_reads_the_old_layout():
    from unirec.model.snapshot import model_config_from
    assert model_config_from({"d_model": 32}).feedback_tokens is True
    assert model_config_from({"d_model": 32, "feedback_tokens": False}).feedback_tokens is False


def test_the_search_loss_trains_the_fusion_not_the_shared_trunk():
    m = _trained_fusion(_model()).train()
    b = context_batch([_hist([1, 2, 3, 4], queries=[[5], None, [7, 8], None])], 30)
    h, _ = m(b)
    m.search_vectors(h, b, torch.tensor([0, 2])).sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in m.blocks.parameters())
    assert m.query_fuse[0].weight.grad.abs().sum() > 0 and m.start_state.grad.abs().sum() > 0
