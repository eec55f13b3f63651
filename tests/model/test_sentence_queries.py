"""The sentence encoder on the query side (`model.sentence_encoder`, model/model.py): a search
reads its query's MiniLM vector through the query fusion (W_s, shared with the items) and
through the semantic channel (semantic_scale * cosine with the items' vectors); training
batches carry each search click's vector to its position; `QueryVectors` encodes each text
once; nothing searches without the vector it needs."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from unirec.model import sentence
from unirec.model.batching import History, collate, train_windows
from unirec.model.config import ModelConfig, TrainConfig
from unirec.model.model import UnifiedRecommender
from unirec.model.trainer import Trainer
from unirec.model.vocab import Vocab

ROOT = Path(__file__).resolve().parents[2]
ITEMS = {"1": {"title": "Toy Story", "genres": ["Animation", "Comedy"]},
         "2": {"title": "Heat", "genres": ["Crime", "Thriller"]},
         "3": {"title": "Apollo 13", "genres": ["Drama"]}}


@pytest.fixture(scope="module")
def encoder() -> sentence.SentenceEncoder:
    return sentence.SentenceEncoder(sentence.fetch(ROOT / ".cache/unirec"))


def _model(encoder, **kw) -> UnifiedRecommender:
    vocab = Vocab.build(ITEMS, n_buckets=100, ngram=3, max_pieces=16, encode=encoder.encode)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, n_buckets=100, max_len=8, sentence_encoder=True, **kw)
    return UnifiedRecommender(cfg, vocab).eval()


def _history(vecs=None) -> History:
    """Four events, the second and fourth searches with their query pieces (and vectors)."""
    return History(np.array([1, 2, 3, 1]), np.array([1, 0, 1, 0]), 10**9 + 60 * np.arange(4), np.array([0, 1, 0, 1]),
                   [None, [3, 4], None, [5]], vecs)


def test_query_vectors_encode_each_text_once_and_forget_the_least_recently_used(encoder):
    qv = sentence.QueryVectors(encoder, max_texts=2)
    out = qv(["heat crime", None, "toy story", "heat crime"])
    assert out[1] is None and out[0] is out[3]
    np.testing.assert_allclose(np.stack([out[0], out[2]]), encoder.encode(["heat crime", "toy story"]), atol=1e-6)
    assert qv.encoded == 2
    qv(["toy story"])
    assert qv.encoded == 2                       # memoised
    qv(["space"])                                # a third text: "heat crime" was used least recently
    qv(["toy story"])
    assert qv.encoded == 3
    qv(["heat crime"])
    assert qv.encoded == 4


def test_a_search_reads_its_query_vector_in_the_semantic_channel_and_the_fusion(encoder):
    m = _model(encoder)
    h = _history()
    q = encoder.encode(["animated toys", "bank robbery"])
    with pytest.raises(ValueError, match="sentence vector"):
        m.search_scores([h], [[5, 6]])           # never a search without the vector it needs
    a, b = (m.search_scores([h], [[5, 6]], query_vecs=[v]) for v in q)
    # W_s starts at 0, so a fresh model differs only in the semantic channel: scale * cosine
    cos = torch.from_numpy(q) @ m.item_sentence.T
    live = slice(1, 4)
    torch.testing.assert_close((a - b)[0, live], (m.semantic_scale * (cos[0] - cos[1]))[live], rtol=1e-4, atol=1e-4)
    assert float(m.semantic_scale) == m.cfg.lexical_init
    # "animated toys" favours Toy Story over Heat, more than "bank robbery" does
    assert a[0, 1] - a[0, 2] > b[0, 1] - b[0, 2]
    with torch.no_grad():
        m.sentence_proj.weight.normal_()
    ua, ub = (m.user_state([h], [[5, 6]], query_vecs=[v]) for v in q)
    assert not torch.allclose(ua, ub)             # the fused search state reads W_s v as well
    assert torch.equal(m.user_state([h]), m.user_state([h]))   # a recommendation reads no query vector


def test_training_windows_carry_each_search_clicks_vector_to_its_position(encoder):
    v = encoder.encode(["q one", "q two", "q three"])
    h = _history([None, v[0], None, v[1]])
    batch = collate(train_windows([h, _history([None, v[2], None, None]).slice(0, 2)], max_len=8))
    flat = (batch["search_target"].reshape(-1) > 0).nonzero().squeeze(1)
    m = _model(encoder)
    np.testing.assert_allclose(m.batch_query_sentences(batch, flat).numpy(), v)
    others = torch.ones(batch["type"].numel(), dtype=torch.bool)
    others[flat] = False
    assert (batch["query_vec_row"].reshape(-1)[others] == 0).all()
    mixed = collate(train_windows([_history()], max_len=8) + train_windows([h], max_len=8))   # none, then some
    flat = (mixed["search_target"].reshape(-1) > 0).nonzero().squeeze(1)
    got = m.batch_query_sentences(mixed, flat).numpy()
    assert not got[:2].any()                     # the first window's searches have no vector: zeros
    np.testing.assert_allclose(got[2:], v[:2])
    plain = collate(train_windows([h], max_len=8, use_query_vecs=False))
    assert "query_vec" not in plain
    with pytest.raises(ValueError, match="sentence vector"):
        m.batch_query_sentences(plain, flat[:2])


def test_training_on_searches_moves_the_semantic_scale_and_the_shared_projection(encoder):
    m = _model(encoder).train()
    v = encoder.encode(["toy story animation", "heat crime thriller"])
    hs = [History(np.array([2, 1, 3, 2]), np.array([1, 1, 0, 1]), 10**9 + 60 * np.arange(4), np.array([0, 1, 0, 1]),
                  [None, [3, 4], None, [5, 7]], [None, v[0], None, v[1]]) for _ in range(4)]
    tr = Trainer(m, TrainConfig(lr=1e-2, batch_size=4, warmup_steps=0, threads=1))
    before = float(m.semantic_scale)
    for batch in [collate(train_windows(hs, max_len=8))] * 3:
        out = tr.step(batch)
    assert "search" in out
    assert float(m.semantic_scale) != before and m.sentence_proj.weight.abs().sum() > 0


def test_versions_saved_before_the_semantic_channel_load_with_its_initial_weight(encoder):
    from unirec.model.snapshot import load_weights

    m = _model(encoder)
    old = {k: v for k, v in m.state_dict().items() if k != "semantic_scale"}
    fresh = _model(encoder)
    with torch.no_grad():
        fresh.semantic_scale.fill_(3.0)
    load_weights(fresh, old)
    assert float(fresh.semantic_scale) == 3.0     # kept the value the model was built with
    with pytest.raises(RuntimeError):
        load_weights(_model(encoder), {k: v for k, v in old.items() if k != "sentence_proj.weight"})


def test_the_offline_dataset_gives_every_search_click_its_vector(encoder, tmp_path):
    import json

    from unirec import offline

    data = tmp_path / "ml-100k"
    data.mkdir()
    (data / "items.jsonl").write_text("".join(json.dumps({"item_id": i, **it}) + "\n" for i, it in ITEMS.items()))
    events = []
    for u in ("a", "b"):
        for k in range(5):
            ts = 10**9 + 60 * k
            if k % 2:
                events.append({"schema": "query/v1", "event_id": f"{u}q{k}", "user_id": u, "query_id": f"{u}{k}",
                               "text": f"film number {k}", "ts": ts})
            events.append({"schema": "click/v1", "event_id": f"{u}c{k}", "user_id": u, "item_id": str(k % 3 + 1),
                           "ts": ts, "label": 1, "rating": 5, "surface": "search" if k % 2 else "rec",
                           "query_id": f"{u}{k}" if k % 2 else None, "position": None})
    (data / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    mc = dataclasses.replace(_model(encoder).cfg, sentence_encoder_path=str(ROOT / ".cache/unirec/minilm"))
    ds = offline.load(data, mc, tmp_path)
    h = ds.full["a"]
    searches = [False, True, False, True, False]
    assert [v is not None for v in h.query_vecs] == [q is not None for q in h.queries] == searches
    np.testing.assert_allclose(h.query_vecs[1], encoder.encode(["film number 1"])[0], atol=1e-6)
