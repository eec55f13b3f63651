"""Online learning: growing/expiring item table, test-then-train, replay, snapshot round trip."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from unirec.model.batching import History, context_batch
from unirec.model.config import EnhancerConfig, ModelConfig, OnlineConfig, TrainConfig, WeighterConfig
from unirec.model import metrics
from unirec.model import online, prequential
from unirec.model.online import Example, OnlineLearner
from unirec.model.prequential import target_ranks
from unirec.model.snapshot import history_from_columns, model_from_arrays
from unirec.model.vocab import ItemTable

DAY = 86400
MC = ModelConfig(d_model=16, n_heads=2, n_buckets=100, max_len=8, dropout=0.0, max_item_pieces=4, ngram=0)
TC = TrainConfig(lr=1e-2, batch_size=8, threads=1, enhancer=EnhancerConfig(warmup_steps=2, positions=8, top_k=3),
                 weighter=WeighterConfig(every=2))


def learner(**online):
    return OnlineLearner.fresh(MC, TC, OnlineConfig(**{"item_capacity": 4, "replay_buffer": 50} | online),
                               pieces_of=lambda i: [int(i) % 90 + 1])


def example(user, items, t0, n_new=None, search_every=0):
    n = len(items)
    surfaces = ["search" if search_every and k % search_every == 0 else "rec" for k in range(n)]
    return Example(str(user), [str(i) for i in items], [int(i) % 2 for i in items],
                   [t0 + 60 * k for k in range(n)], surfaces,
                   [f"film {i}" if s == "search" else None for i, s in zip(items, surfaces)],
                   n if n_new is None else n_new)


def cyclic_batch(start, users=6, length=10, t0=10**9):
    """Item i is followed by i + 1 (cyclic over 12 items), from different offsets per user."""
    return [example(u, [(start + u + k) % 12 + 1 for k in range(length)], t0) for u in range(users)]


# ---------------------------------------------------------------- the item table

def test_new_ids_get_rows_without_a_restart_and_the_table_doubles_when_full():
    t = ItemTable(4, 2, pieces_of=lambda i: [7])
    rows, new = t.assign(["a", "b", "c"], [1, 2, 3])
    assert list(rows) == [1, 2, 3] and new == [1, 2, 3] and t.n_rows == 4
    rows, new = t.assign(["a", "d"], [4, 5])            # full: grows
    assert rows[0] == 1 and new == [rows[1]] and t.n_rows == 7 and t.grown == 1
    assert t.item_id(rows[1]) == "d" and t.pieces[rows[1], 0] == 7 and t.live.sum() == 4


def test_items_unseen_for_the_expiry_time_lose_their_rows_which_are_reused():
    t = ItemTable(4, 2, expire_after_s=10 * DAY)
    t.assign(["a", "b", "c"], [0, 0, 20 * DAY])
    freed = t.expire(25 * DAY)                           # a, b last seen 25 days ago
    assert sorted(freed) == [1, 2] and t.expired == 2 and t.row("a") == 0 and t.row("c") == 3
    rows, new = t.assign(["e"], [25 * DAY])
    assert new == [1] and t.n_rows == 4                  # reused, not grown
    assert list(t.live) == [False, True, False, True]


def test_table_restore_gives_back_rows_and_last_seen():
    t = ItemTable(4, 2, pieces_of=lambda i: [int(i)])
    t.assign(["1", "2", "3", "9"], [5, 6, 7, 8])
    back = ItemTable.restore(t.live_ids(), t.arrays(), t.pieces, 2)
    assert back.index == t.index and back.n_rows == t.n_rows and back.free == t.free
    assert all(back.last_seen[r] == t.last_seen[r] for r in t.index.values())


# ---------------------------------------------------------------- the learner

def test_windows_make_every_new_event_a_target_exactly_once():
    lr = learner()
    h = history_from_columns([str(i % 12 + 1) for i in range(30)], [1] * 30, list(range(30)), ["rec"] * 30,
                             [None] * 30, lr.table, MC)
    for n_new in (1, 5, 8, 13, 30):
        lists = lr._windows(h, n_new)
        assert sum(sum(1 for x in w["rank_label"] if x >= 0) for w in lists) == n_new
        assert all(len([x for x in w["type"] if x == 0]) <= MC.max_len for w in lists)


def test_growing_table_keeps_training_and_optimiser_state_in_step():
    lr = learner(item_capacity=4)
    stats = lr.process(cyclic_batch(0))
    assert stats["items_new"] == 12 and lr.table.n_rows >= 13 and stats["steps"] >= 1
    emb = lr.model.item_emb.weight
    assert emb.shape[0] == lr.table.n_rows
    assert lr.trainer.opt.state[emb]["exp_avg"].shape == emb.shape
    assert sum(p is emb for g in lr.trainer.opt.param_groups for p in g["params"]) == 1


def test_test_then_train_scores_the_batch_with_the_model_before_it_trains_on_it():
    lr = learner()
    lr.process(cyclic_batch(0))                          # items exist, model partly trained
    batch = cyclic_batch(3)
    before = copy.deepcopy(lr)
    expected = before.evaluate([w for e in batch for w in before._windows(before._history(e), e.n_new)]).means()
    stats = lr.process(batch, fuse=False)                # the batch-level protocol: one pass before any step
    assert stats["eval"]["ndcg@10"] == pytest.approx(expected["ndcg@10"])
    # every new event with an event before it is scored once (a user's first event has no state to predict from)
    assert stats["eval"]["eval_events"] == sum(e.n_new for e in batch) - len(batch)
    assert stats["steps"] >= 1 and not torch.equal(lr.model.item_emb.weight, before.model.item_emb.weight)


def spy_steps(lr, monkeypatch, before_step):
    """Call `before_step(fresh_token_lists, n_rows)` right before each optimiser step of `lr`,
    with the new windows of that step (collate's first rows; the replayed ones follow)."""
    collated = []
    real_collate = online.collate
    monkeypatch.setattr(online, "collate", lambda lists: collated.append(list(lists)) or real_collate(lists))
    step, n_replay = lr.trainer.step, round(lr.trainer.cfg.batch_size * lr.cfg.replay_fraction)

    def spied(batch, inspect=None, lr_mult=1.0):
        lists = collated[-1]
        before_step(lists[: len(lists) - min(n_replay, len(lr.buffer))], len(lists))
        return step(batch, inspect=inspect, lr_mult=lr_mult)
    monkeypatch.setattr(lr.trainer, "step", spied)


def test_scores_off_the_training_pass_equal_a_separate_eval_pass_before_each_step(monkeypatch):
    lr = learner()
    lr.process([example(u, [(u + k) % 12 + 1 for k in range(10)], 10**9, search_every=3) for u in range(6)])
    batch = [example(u, [(u + k + 3) % 12 + 1 for k in range(10)], 10**9 + DAY, search_every=3) for u in range(6)]
    ref, fresh_rows = prequential.EvalSums(k=10), []

    def separate_pass(fresh, n_rows):                    # the model as it is right before this step
        fresh_rows.append((len(fresh), n_rows))
        ref.merge(OnlineLearner.evaluate(copy.deepcopy(lr), fresh))
    spy_steps(lr, monkeypatch, separate_pass)
    calls = []
    monkeypatch.setattr(lr, "evaluate", lambda lists: calls.append(lists))
    stats = lr.process(batch)
    assert not calls and stats["steps"] == len(fresh_rows) >= 2           # fused: no pass of its own
    assert all(n_rows > n for n, n_rows in fresh_rows)                    # replayed rows rode along, unscored
    got, want = stats["eval"], ref.means()
    for k in ("eval_events", "eval_search_events", "eval_rank_events"):
        assert got[k] == want[k] > 0
    for k in ("hr@10", "ndcg@10", "search_recall@10", "search_ndcg@10", "auc"):
        assert got[k] == pytest.approx(want[k], abs=1e-9)
    pairs = lambda p, l: sorted(zip(l, np.round(p, 5)))
    assert pairs(stats["rank_probs"], stats["rank_labels"]) == pairs(ref.probs, ref.labels)


def test_no_new_event_is_scored_by_a_model_that_trained_on_it_or_on_a_later_event_of_its_user(monkeypatch):
    lr = learner(replay_fraction=0.0)
    # more new events per user than fit one window (max_len 8): several windows per user, spread over steps
    batch = [example(u, [(u + k) % 12 + 1 for k in range(30)], u * 10**6) for u in range(6)]
    trained: dict = {}                                   # user -> latest target time trained on so far
    checked = []

    def before_step(fresh, n_rows):
        for w in fresh:                                  # this step's windows are scored before its update
            targets = [ts for ts, lab in zip(w["ts"], w["rank_label"]) if lab >= 0]
            user = targets[0] // 10**6
            assert min(targets) > trained.get(user, -1)
            checked.append(len(targets))
        for w in fresh:
            targets = [ts for ts, lab in zip(w["ts"], w["rank_label"]) if lab >= 0]
            trained[targets[0] // 10**6] = max(trained.get(targets[0] // 10**6, -1), max(targets))
    spy_steps(lr, monkeypatch, before_step)
    stats = lr.process(batch)
    assert sum(checked) == 6 * 30 and stats["steps"] >= 4
    assert stats["eval"]["eval_events"] == 6 * 29


def test_fine_tuning_turns_the_models_dropout_off_unless_asked_to_keep_it(monkeypatch):
    mc = dataclasses.replace(MC, dropout=0.1, rank_dropout=0.5)
    calls = []
    for keep in (False, True):
        lr = OnlineLearner.fresh(mc, TC, OnlineConfig(item_capacity=4, dropout=keep), pieces_of=lambda i: [1])
        assert lr.model.has_dropout is keep
        lr.model.train()
        batch = context_batch([History(np.array([1, 2, 3]), np.array([1, 0, 1]), np.array([0, 60, 120]),
                                       np.zeros(3, dtype=np.int64), [None] * 3)], 8)
        twice = [lr.model.rank_logits(lr.model(batch)[0]) for _ in range(2)]
        assert torch.equal(*twice) is not keep          # a training forward is random only with dropout
        evaluate = lr.evaluate
        monkeypatch.setattr(lr, "evaluate", lambda lists, ev=evaluate: calls.append(len(lists)) or ev(lists))
        calls.clear()
        stats = lr.process(cyclic_batch(0))
        # dropout kept: the training pass is not the eval pass, so a separate one scores the batch first
        assert calls == ([stats["sequences"]] if keep else []) and stats["eval"]["eval_events"] == 6 * 9


def test_capped_batches_fall_back_to_a_pass_before_the_steps():
    capped = learner(max_steps_per_batch=1)
    stats = capped.process(cyclic_batch(0, users=12, length=20))
    assert stats["deferred"] > 0 and stats["eval"]["eval_events"] == 12 * 19     # deferred windows scored too


def test_online_updates_learn_the_stream():
    lr = learner(replay_fraction=0.25)
    first = lr.process(cyclic_batch(0))["eval"]["ndcg@10"]
    for s in range(1, 40):
        last = lr.process(cyclic_batch(s))
    assert last["eval"]["ndcg@10"] > max(0.5, first + 0.3)
    assert last["eval"]["auc"] > 0.8                       # odd items liked


def test_expired_items_are_no_longer_candidates():
    lr = learner(expire_after_s=DAY)
    lr.process([example(1, [1, 2, 3], 0)])
    lr.process([example(2, [4, 5], 3 * DAY)])              # 1, 2, 3 expire (watermark moved 3 days)
    scores = lr.model.retrieval_scores(torch.zeros(1, MC.d_model) + 1.0)
    live = lr.table.live
    assert torch.isinf(scores[0, ~torch.as_tensor(live)]).all() and torch.isfinite(scores[0, torch.as_tensor(live)]).all()
    assert lr.table.expired == 3 and sorted(lr.table.live_ids()) == ["4", "5"]


def test_buffered_windows_holding_expired_rows_are_forgotten():
    lr = learner(expire_after_s=DAY)
    lr.process([example(1, [1, 2, 3], 0), example(2, [4, 5], DAY // 2)])
    assert len(lr.buffer) == 2
    lr.process([example(3, [5, 6], DAY + DAY // 4)])          # 1, 2, 3 expire; 4 and 5 do not
    rows = {r for w in lr.buffer for r in np.asarray(w["item"]).tolist()}
    assert len(lr.buffer) == 2 and rows == {lr.table.row(i) for i in ("4", "5", "6")}


def test_replay_buffer_is_bounded_and_mixed_into_steps():
    lr = learner(replay_buffer=5, replay_fraction=0.5)
    for s in range(3):
        lr.process(cyclic_batch(s))
    assert len(lr.buffer) == 5


def moved(a, b) -> float:
    """How far the transformer blocks' weights of model `a` are from model `b`'s."""
    return float(sum((pa.detach() - pb.detach()).norm() ** 2
                     for pa, pb in zip(a.blocks.parameters(), b.blocks.parameters())) ** 0.5)


def test_steps_short_of_new_windows_take_a_proportionally_smaller_learning_rate():
    # batch_size 8, no replay: a step holds up to 8 new windows
    tc = dataclasses.replace(TC, warmup_steps=1, lr_decay="none")
    make = lambda: OnlineLearner.fresh(MC, tc, OnlineConfig(item_capacity=4, replay_buffer=0, lr_decay_steps=0),
                                       pieces_of=lambda i: [int(i) % 90 + 1])
    whole, cut = make(), make()
    users = cyclic_batch(0, users=8, length=6)           # one window each (6 <= max_len): one full step
    assert whole.process(users)["lr"] == pytest.approx(tc.lr)
    for k in range(0, 8, 2):                             # the same windows as four micro-batches of two
        assert cut.process(users[k:k + 2])["lr"] == pytest.approx(tc.lr * 2 / 8)
    # so the weights travel about as far as in one step over all eight, not four full steps' way
    init = make().model
    assert moved(cut.model, init) < 1.5 * moved(whole.model, init)


def test_max_steps_per_batch_defers_the_rest_and_counts_it():
    lr = learner(max_steps_per_batch=1)
    stats = lr.process(cyclic_batch(0, users=12, length=20))
    assert stats["steps"] == 1 and stats["deferred"] > 0 and lr.totals["deferred"] == stats["deferred"]


def test_snapshot_round_trip_restores_model_table_and_optimiser():
    lr = learner()
    for s in range(3):
        lr.process(cyclic_batch(s, length=6))
    snap = lr.snapshot()
    back = OnlineLearner.from_arrays(MC, TC, OnlineConfig(item_capacity=4), item_ids=snap["item_ids"],
                                     weights=snap["ranking"], table_arrays=snap["extra"]["idtable"],
                                     trainer_arrays=snap["extra"]["trainer"])
    back.model.eval()
    lr.model.eval()
    h = [history_from_columns(["1", "2", "3"], [1, 0, 1], [1, 2, 3], ["rec"] * 3, [None] * 3, lr.table, MC)]
    torch.testing.assert_close(back.model.user_state(h), lr.model.user_state(h))
    rows = [lr.table.row(i) for i in snap["item_ids"]]
    np.testing.assert_allclose(back.model.item_embeddings()[rows].detach().numpy(), snap["item_embeddings"],
                               rtol=1e-6, atol=1e-6)
    assert back.trainer.steps == lr.trainer.steps
    assert back.trainer.weighter.state_dict() == lr.trainer.weighter.state_dict()
    assert lr.trainer.weighter.weights != {"retrieval": 1.0, "ranking": 1.0}    # it had moved: a real check
    p = dict(back.model.named_parameters())["blocks.0.attn.qkv.weight"]
    q = dict(lr.model.named_parameters())["blocks.0.attn.qkv.weight"]
    torch.testing.assert_close(back.trainer.opt.state[p]["exp_avg"], lr.trainer.opt.state[q]["exp_avg"])
    model, table = model_from_arrays(MC, snap["item_ids"], snap["ranking"], snap["extra"]["idtable"])
    assert table.index == lr.table.index and model.item_live.sum() == len(snap["item_ids"])


def test_publish_figures_cover_the_span_since_the_last_publish():
    lr = learner()
    lr.process(cyclic_batch(0))
    lr.process(cyclic_batch(1))
    f = lr.publish_figures()
    assert f["metrics"]["eval_events"] == 2 * 6 * 9 and f["steps"] == lr.trainer.steps and f["grad_norm"] > 0
    lr.published()
    assert lr.publish_figures()["metrics"]["eval_events"] == 0 and lr.publish_figures()["steps"] == 0


def test_search_events_are_scored_with_the_query():
    lr = learner()
    stats = lr.process([example(u, [(u + k) % 12 + 1 for k in range(9)], 10**9, search_every=3) for u in range(4)])
    assert stats["eval"]["eval_search_events"] == 4 * 3 and stats["eval"]["search_recall@10"] is not None


def test_next_item_figures_rank_as_recommend_scores_does_repeat_logit_included():
    lr = learner()
    lr.process(cyclic_batch(0))
    with torch.no_grad():
        lr.model.repeat_logit.fill_(0.2)                  # +2.9 logits on items of the context window
    batch = [example(u, [(u + k) % 3 + 1 for k in range(MC.max_len)], 10**9) for u in range(3)]  # repeats
    hists = [lr._history(e) for e in batch]
    lr._sync_table()
    ranks = []
    for h in hists:                                       # offline: one history prefix per target
        for j in range(1, len(h)):
            s = lr.model.recommend_scores([h.slice(0, j)])
            ranks.append(int(metrics.target_ranks(s, [h.items[j]])[0]))
    ranks = np.array(ranks)
    expected = np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0).mean()
    got = lr.process(batch, train=False)["eval"]
    assert got["eval_events"] == len(ranks) and got["ndcg@10"] == pytest.approx(expected)
    lr.model.repeat_logit.data.fill_(0.0)                 # the figure does move with the repeat logit
    assert lr.process(batch, train=False)["eval"]["ndcg@10"] != pytest.approx(expected)


def test_fast_target_ranks_match_the_metrics_module():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 4, (50, 9), generator=g).float()     # many ties
    s[::7, 3] = float("nan")
    s[::5, :] = float("-inf")
    t = torch.randint(1, 9, (50,), generator=g)
    np.testing.assert_array_equal(target_ranks(s, t), metrics.target_ranks(s, t))
    s[:, 7:] = float("-inf")                                   # free rows past the last live one
    np.testing.assert_array_equal(target_ranks(s, t.clamp(max=6), n_cols=7), metrics.target_ranks(s, t.clamp(max=6)))


def test_old_context_is_cut_without_changing_the_windows():
    lr = learner()
    ex = example(1, [k % 12 + 1 for k in range(40)], 10**9, n_new=3)
    full = lr._windows(lr._history(ex), 3)
    cut = lr._needed(ex)
    assert len(cut.item_ids) == 3 + MC.max_len and cut.item_ids[-1] == ex.item_ids[-1]
    assert [as_lists(w) for w in lr._windows(lr._history(cut), 3)] == [as_lists(w) for w in full]


def as_lists(window: dict) -> dict:
    """A window's columns as plain lists (`event_tokens` gives arrays; () for "no query", as [])."""
    return {k: [list(q) for q in v] if k == "query" else
            [None if x is None else x.tolist() for x in v] if k == "query_vec" else
            list(np.asarray(v).tolist()) for k, v in window.items()}



def test_online_lr_decays_over_the_lineage_first_steps_then_stays_at_the_floor():
    tc = TrainConfig(lr=1e-2, batch_size=8, warmup_steps=1, min_lr_ratio=0.1, threads=1)
    oc = OnlineConfig(item_capacity=4, lr_decay_steps=6)
    lr = OnlineLearner.fresh(MC, tc, oc, pieces_of=lambda i: [1])
    rates = [lr.process(cyclic_batch(s))["lr"] for s in range(6)]
    assert rates[0] > 0.5 * tc.lr and rates[-1] == pytest.approx(tc.lr * tc.min_lr_ratio)
    snap = lr.snapshot()                                  # a resumed model keeps the floor: steps travel along
    back = OnlineLearner.from_arrays(MC, tc, oc, item_ids=snap["item_ids"], weights=snap["ranking"],
                                     table_arrays=snap["extra"]["idtable"], trainer_arrays=snap["extra"]["trainer"])
    assert back.process(cyclic_batch(7))["lr"] == pytest.approx(tc.lr * tc.min_lr_ratio)
    const = OnlineLearner.fresh(MC, tc, OnlineConfig(item_capacity=4, lr_decay_steps=0))
    assert [const.process(cyclic_batch(s))["lr"] for s in range(6)][-1] == pytest.approx(tc.lr)


def test_online_min_lr_ratio_sets_the_fine_tuning_floor_and_a_budgeted_fit_keeps_the_trains():
    tc = TrainConfig(lr=1e-2, batch_size=8, warmup_steps=1, min_lr_ratio=0.1, threads=1)
    oc = OnlineConfig(item_capacity=4, lr_decay_steps=6, min_lr_ratio=0.3)
    lr = OnlineLearner.fresh(MC, tc, oc, pieces_of=lambda i: [1])
    rates = [lr.process(cyclic_batch(s))["lr"] for s in range(8)]
    assert rates[0] > 0.5 * tc.lr and rates[-1] == pytest.approx(tc.lr * oc.min_lr_ratio)
    tr = lr.trainer                                       # an offline fit on the same trainer: train's floor
    tr.cfg = dataclasses.replace(tr.cfg, max_steps=4, epochs=50, patience=50)
    hist = lr._histories([Example("u", [f"i{k % 4}" for k in range(12)], [1] * 12, list(range(12)),
                                  ["rec"] * 12, [None] * 12, 12)])
    lr._sync_table()                                      # rows for the new items, as process does
    seen = []
    tr.fit(hist, lambda: seen.append(tr.lr_scale()) or 0.0, log=lambda line: None)
    assert seen[-1] == pytest.approx(tc.min_lr_ratio)
    assert tr.floor == oc.min_lr_ratio                    # and fine-tuning after it keeps the online floor


def test_repeat_logit_added_in_place_equals_the_models_repeat_scores():
    lr = learner()
    lr.process(cyclic_batch(0))
    with torch.no_grad():
        lr.model.repeat_logit.fill_(0.13)
    batch = online.collate([w for e in cyclic_batch(2) for w in lr._windows(lr._history(e), e.n_new)])
    g = torch.Generator().manual_seed(1)
    flat = torch.randperm(batch["type"].numel(), generator=g)[:40]
    scores = torch.randn(40, lr.model.item_live.shape[0], generator=g)
    scores[:, 0] = float("-inf")
    with torch.no_grad():
        want = scores + lr.model.repeat_scores(batch, flat)
    got = lr.model.add_repeat_scores_(scores.clone(), batch, flat)
    assert torch.equal(got, want) and not torch.equal(want, scores)


def test_search_figures_rank_as_search_scores_does():
    lr = learner()
    lr.process([example(u, [(u + k) % 12 + 1 for k in range(9)], 10**9, search_every=3) for u in range(4)])
    batch = [Example(str(u), [str((u + k) % 12 + 1) for k in range(MC.max_len)], [k % 2 for k in range(8)],
                     [10**9 + DAY + 60 * k for k in range(8)], ["search" if k % 3 == 2 else "rec" for k in range(8)],
                     [f"film {(u + k) % 12 + 1}" if k % 3 == 2 else None for k in range(8)], 8) for u in range(3)]
    hists = [lr._history(e) for e in batch]
    lr._sync_table()
    ranks = []
    for h in hists:                                       # offline: the history before each search, and its query
        for j in range(len(h)):
            if h.queries[j] is not None:
                s = lr.model.search_scores([h.slice(0, j)], [h.queries[j]])
                ranks.append(int(metrics.target_ranks(s, [h.items[j]])[0]))
    ranks = np.array(ranks)
    got = lr.process(batch, train=False)["eval"]
    assert got["eval_search_events"] == len(ranks) == 3 * 2
    assert got["search_ndcg@10"] == pytest.approx(np.where(ranks < 10, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
    assert got["search_recall@10"] == pytest.approx((ranks < 10).mean())


def test_event_tokens_equal_batchings_token_lists():
    from unirec.model.batching import History, _tokens, event_tokens
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(0, 10))
        queries = [None if rng.random() < 0.6 else [int(x) for x in rng.integers(1, 50, rng.integers(0, 4))]
                   for _ in range(n)]                        # includes [] (a query without pieces)
        vecs = None if rng.random() < 0.5 else [rng.random(3) for q in queries]   # (one without a query: unused)
        h = History(rng.integers(1, 30, n), rng.integers(0, 2, n), np.sort(rng.integers(0, 10**6, n)),
                    rng.integers(0, 2, n), queries, vecs)
        for loss_from in range(n + 1):
            for use_queries in (True, False):
                for use_feedback in (True, False):
                    fast = event_tokens(h, loss_from, use_queries, use_feedback)
                    assert all(v.dtype == np.int64 for k, v in fast.items() if k not in ("query", "query_vec"))
                    assert as_lists(fast) == as_lists(_tokens(h, loss_from, use_queries, use_feedback))


def _fresh_and_replayed(lr):
    """A trained learner's collated batch: 4 fresh windows (with searches and repeated items),
    then 3 others, as a step's fresh + replayed windows."""
    lr.process([example(u, [(u + k) % 12 + 1 for k in range(10)], 10**9, search_every=3) for u in range(6)])
    with torch.no_grad():
        lr.model.repeat_logit.fill_(0.1)
    exs = [example(u, [(u + k // 2) % 5 + 1 for k in range(9)], 10**9 + DAY, search_every=2) for u in range(7)]
    return online.collate([w for e in exs for w in lr._windows(lr._history(e), e.n_new)]), 4


def test_scores_handed_over_by_the_loss_rank_as_scores_computed_for_evaluation():
    """The loss's full-catalogue logits (item bias + repeat logit; search: + lexical channel)
    are the evaluation's scores: ranking them gives the figures computing them again does."""
    from unirec.model import losses
    lr = learner()
    batch, n = _fresh_and_replayed(lr)
    m, temp = lr.model, MC.temperature
    with torch.no_grad():
        h, _ = m(batch)
        items = m.item_embeddings()
        B, T, d = h.shape
        rows = (batch["rec_target"].reshape(-1) > 0).nonzero().squeeze(1)
        srows = (batch["search_target"].reshape(-1) > 0).nonzero().squeeze(1)
        rec = losses.catalogue_logits(m.user_vectors(h.reshape(B * T, d)[rows]), items, temperature=temp,
                                      bias=m.repeat_scores(batch, rows) + m.item_bias())
        lex = m.lexical_scores(batch["query"].reshape(B * T, -1)[srows])
        srch = losses.catalogue_logits(m.search_vectors(h, batch, srows), items, temperature=temp,
                                       bias=lex + m.item_bias())
    scored = {"rec": {"rows": rows, "scores": rec}, "search": {"rows": srows, "scores": srch},
              "rank": m.rank_logits(h).detach()}
    given, computed = prequential.EvalSums(), prequential.EvalSums()
    prequential.score_states(m, batch, h, items, given, n, scored=scored)
    prequential.score_states(m, batch, h, items, computed, n)
    assert given.rec_n == computed.rec_n > 0 and given.search_n == computed.search_n > 0
    assert given.rec_n < len(rows) and given.search_n < len(srows)         # the replayed rows are left out
    assert (given.hits, given.ndcg, given.search_hits, given.search_ndcg) == (
        computed.hits, computed.ndcg, computed.search_hits, computed.search_ndcg)
    assert np.allclose(given.probs, computed.probs, atol=1e-6) and given.labels == computed.labels


def test_the_trainer_hands_its_own_scores_to_test_then_train():
    lr = learner()
    batch, n = _fresh_and_replayed(lr)
    seen = []
    lr.trainer.losses(batch, inspect=lambda h, items, scored=None: seen.append(scored))
    if seen[0] is None:
        pytest.skip("this Trainer does not hand its loss scores to inspect (model/trainer.py)")
    assert seen[0]["rec"]["scores"].shape == (len(seen[0]["rec"]["rows"]), lr.model.item_live.shape[0])
    assert not seen[0]["rec"]["scores"].requires_grad and seen[0]["rank"].shape == batch["type"].shape
