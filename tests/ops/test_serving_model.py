"""`unirec.ops.servable`: serving scores are the model's own (the offline evaluation's), computed
in one trunk pass per batch; the learned repeat logit is used; batching changes no answer; a
version whose one-pass scoring disagrees with its model falls back to the model's calls."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from unirec.features.sequence import UserSequence
from unirec.model.config import ModelConfig, OnlineConfig, TrainConfig
from unirec.model.online import OnlineLearner
from unirec.model.snapshot import load_snapshot
from unirec.model.text import hash_pieces
from unirec.ops import servable as sv
from unirec.ops.registry import Registry

NAMES = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
         "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango"]
ITEMS = [f"i{n}" for n in range(len(NAMES))]
MC = ModelConfig(d_model=16, n_layers=2, n_heads=2, n_buckets=512, max_len=6, max_item_pieces=8,
                 max_query_pieces=8, dropout=0.0)
VARIANTS = {
    "default": {},
    "one_layer": {"n_layers": 1},
    "feedback_tokens": {"feedback_tokens": True},
    "no_feedback": {"use_feedback": False},
    "no_queries": {"use_queries": False},
    "normalized_no_repeat": {"normalize": True, "repeat_bias": False},
    "sentence": {"sentence_encoder": True},
}
QUERIES = ("golf", "kilo lima", "zulu", "alpha", "romeo")


def fake_sentences(texts):
    """A stand-in for the MiniLM encoder (its own tests are in tests/model/test_sentence.py):
    a fixed random unit vector per text, or None."""
    out = []
    for t in texts:
        if t is None:
            out.append(None)
            continue
        v = np.random.default_rng(sum(map(ord, t))).standard_normal(384).astype(np.float32)
        out.append(v / np.linalg.norm(v))
    return out


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models: single-threaded (tests/conftest.py: `one_thread`)."""


def servable(tmp_path, mc: ModelConfig = MC, *, repeat: float = 0.0, candidates: int = 8) -> sv.Servable:
    """A published version with weights far from their tiny initial values (so that a wrong
    token, mask or position changes the scores visibly), loaded for serving."""
    text = dict(zip(ITEMS, NAMES))
    pieces_of = lambda iid: hash_pieces(text[iid], mc.n_buckets, ngram=mc.ngram, max_pieces=mc.max_item_pieces)  # noqa: E731
    qv = fake_sentences if mc.sentence_encoder else None
    learner = OnlineLearner.fresh(mc, TrainConfig(seed=3), OnlineConfig(item_capacity=32), pieces_of=pieces_of,
                                  sentence_of=lambda iid: fake_sentences([text[iid]])[0], query_vectors=qv)
    learner.table.assign(ITEMS, [0] * len(ITEMS))
    learner.model.refresh_items()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            if name not in ("repeat_logit", "lex_scale"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        learner.model.repeat_logit.fill_(repeat)
    snap = learner.snapshot()
    reg = Registry(tmp_path / "registry")
    v = reg.publish(item_embeddings=snap["item_embeddings"], item_ids=snap["item_ids"], ranking=snap["ranking"],
                    extra={"idtable": snap["extra"]["idtable"]}, watermark=None, offsets={}, metrics={},
                    model_config=mc).version
    return sv.Servable(load_snapshot(reg, v), candidates, qv)


def sequences(n: int = 5) -> list[UserSequence]:
    """Users with 1 to 9 events (some longer than max_len), mixed labels, some search clicks."""
    out = []
    for u in range(n):
        m = 1 + 2 * u
        items = tuple(ITEMS[(3 * u + j) % len(ITEMS)] for j in range(m))
        qids = tuple(f"q{u}-{j}" if j % 3 == 1 else "" for j in range(m))
        queries = [q for q in qids if q]
        out.append(UserSequence(
            f"u{u}", items, tuple((u + j) % 2 for j in range(m)), tuple(1_000_000 + 5_000 * j + u for j in range(m)),
            tuple("search" if q else "rec" for q in qids), qids, tuple(queries),
            tuple(NAMES[(3 * u + int(q.split("-")[1])) % len(NAMES)] for q in queries),
            tuple(1_000_000 + 5_000 * int(q.split("-")[1]) + u for q in queries),
            watermark=1_000_000 + 5_000 * (m - 1) + u, total_clicks=m))
    return out


def reference(s: sv.Servable, seqs, ks, exclude_seen, pieces=None, texts=None) -> list[tuple[list, list]]:
    """Retrieval logits from the model's public calls (what the offline evaluation ranks with),
    the top candidates re-ranked by `model.rank`: P(choose) x P(positive)."""
    m = s.model
    hs = [s.history(q) for q in seqs]
    with torch.no_grad():
        if pieces is None:
            logits = m.recommend_scores(hs)[:, s.rows]
        else:
            vecs = fake_sentences(texts) if m.cfg.sentence_encoder else None
            logits = m.search_scores(hs, pieces, [int(q.ts[-1]) for q in seqs], vecs)[:, s.rows]
    out = []
    for b, (q, k, excl) in enumerate(zip(seqs, ks, exclude_seen)):
        row = logits[b].clone()
        if excl:
            row[[s.ids.index(i) for i in set(q.item_ids)]] = -math.inf
        c = min(max(s.candidates, k), int(torch.isfinite(row).sum()))
        top = row.topk(c).indices
        with torch.no_grad():
            prob = m.rank([hs[b]], s.rows[top][None])[0]
        score = torch.softmax(row, 0)[top] * prob
        order = score.argsort(descending=True)[:k]
        out.append(([s.ids[j] for j in top[order].tolist()], score[order].tolist()))
    return out


def assert_same_lists(got, want):
    for (items, scores), (w_items, w_scores) in zip(got, want, strict=True):
        assert items == w_items
        np.testing.assert_allclose(scores, w_scores, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_pass_states_and_candidates_equal_the_models_forward(tmp_path, variant):
    s = servable(tmp_path, dataclasses.replace(MC, **VARIANTS[variant]))
    assert s.one_pass, "the load-time self-check must accept an unchanged model"
    m = s.model
    hs = [s.history(q) for q in sequences()]
    with torch.no_grad():
        batch = m._context(hs)
        B, last = len(hs), batch["length"] - 1
        state, cache = sv.state_and_cache(m, batch, last)
        full, _ = m(batch)
        torch.testing.assert_close(state, full[torch.arange(B), last], rtol=1e-4, atol=1e-5)
        items = s.rows[torch.randperm(len(s.rows), generator=torch.Generator().manual_seed(0))[:7]].expand(B, -1)
        prefix = batch["length"] - torch.tensor([0, 1, 0, 2, 0])                  # also a shorter history prefix
        ts = batch["ts"][torch.arange(B), prefix - 1] + 60
        _, want = m(batch, items, prefix[:, None].expand(-1, 7), ts[:, None].expand(-1, 7))
        torch.testing.assert_close(sv.candidate_hidden(m, cache, batch, prefix, items, ts), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_recommend_and_search_rank_like_the_models_own_calls(tmp_path, variant):
    s = servable(tmp_path, dataclasses.replace(MC, **VARIANTS[variant]), repeat=1.0)
    assert s.one_pass
    seqs = sequences()
    ks, excl = [3, 5, 20, 1, 8], [True, False, True, False, False]
    assert_same_lists(s.recommend_many(seqs, ks, excl), reference(s, seqs, ks, excl))
    mc = s.model.cfg
    pieces = [hash_pieces(q, mc.n_buckets, ngram=mc.ngram, max_pieces=mc.max_query_pieces)
              for q in QUERIES]
    assert_same_lists(s.search_many(seqs, pieces, ks, list(QUERIES)),
                      reference(s, seqs, ks, [False] * 5, pieces, list(QUERIES)))


def test_a_sentence_version_embeds_each_query_and_is_not_served_without_the_encoder(tmp_path):
    s = servable(tmp_path, dataclasses.replace(MC, sentence_encoder=True))
    seqs, mc = sequences(), s.model.cfg
    pieces = [hash_pieces("golf", mc.n_buckets, ngram=mc.ngram, max_pieces=mc.max_query_pieces)] * len(seqs)
    a = s.search_many(seqs, pieces, [5] * 5, ["golf"] * 5)
    b = s.search_many(seqs, pieces, [5] * 5, ["something else entirely"] * 5)   # same pieces, another text
    assert [x[1] for x in a] != [x[1] for x in b]
    cold_a, cold_b = s.search_cold(pieces[0], 5, "golf"), s.search_cold(pieces[0], 5, "something else entirely")
    assert cold_a[1] != cold_b[1]
    with pytest.raises(ValueError, match="sentence_encoder"):
        sv.Servable(s.snap, 8)


def test_answers_do_not_depend_on_what_else_is_in_the_batch(tmp_path):
    s = servable(tmp_path, repeat=0.5)
    seqs = sequences()
    alone = [s.recommend(q, 4, False) for q in seqs]
    together = s.recommend_many(seqs, [4] * 5, [False] * 5)
    assert [a[0] for a in alone] == [t[0] for t in together]
    np.testing.assert_allclose([a[1] for a in alone], [t[1] for t in together], rtol=1e-4)   # float rounding only


def test_recommend_uses_the_learned_repeat_logit(tmp_path):
    """Offline evaluation ranks with the repeat logit on the items of the context window;
    serving does too (visible with exclude_seen=false)."""
    seq = sequences()[3]                                     # 7 events, max_len 6: a window of 6 items
    window = set(seq.item_ids[-MC.max_len:])
    k = len(window)
    keen, shy = servable(tmp_path / "a", repeat=40.0, candidates=20), servable(tmp_path / "b", repeat=-40.0, candidates=20)
    assert keen.one_pass and shy.one_pass
    keen, shy = keen.recommend(seq, k, False)[0], shy.recommend(seq, k, False)[0]
    assert set(keen) == window
    assert not set(shy) & window


def test_a_version_whose_one_pass_disagrees_is_served_by_the_models_own_passes(tmp_path, monkeypatch):
    broken = lambda m, cache, batch, prefix, items, ts: torch.zeros(*items.shape, m.cfg.d_model)  # noqa: E731
    monkeypatch.setattr(sv, "candidate_hidden", broken)
    s = servable(tmp_path, repeat=1.0)
    assert not s.one_pass
    seqs = sequences()
    assert_same_lists(s.recommend_many(seqs, [5] * 5, [True] * 5), reference(s, seqs, [5] * 5, [True] * 5))


def test_the_server_loads_a_sentence_version_only_with_a_query_encoder(tmp_path):
    """A version trained with `sentence_encoder` needs each query's vector: a server without
    the encoder refuses it at load (counted, logged), one with it serves it."""
    from prometheus_client import CollectorRegistry

    from unirec.ops.metrics import ServingMetrics

    servable(tmp_path, dataclasses.replace(MC, sentence_encoder=True))     # publishes into tmp_path/registry
    reg = Registry(tmp_path / "registry")
    load = lambda name: load_snapshot(reg, name)  # noqa: E731
    metrics = ServingMetrics(CollectorRegistry())
    latest, loaded = sv.ModelHolder(reg, load, 8, metrics).refresh({"latest"})
    assert latest is None and not loaded
    assert metrics.loads.labels("failed")._value.get() == 1
    asked = []
    holder = sv.ModelHolder(reg, load, 8, metrics, query_vectors=lambda mc: asked.append(mc) or fake_sentences)
    latest, loaded = holder.refresh({"latest"})
    assert latest == reg.latest() and loaded[latest].query_vectors is fake_sentences
    assert asked and asked[0].sentence_encoder
