"""Simulated users for A/B rollouts, driven by held-out MovieLens-100k behaviour.

**Population.** Every ML-100k user with at least `min_clicks` clicks. Each
user's clicks are cut in time: the first `1 - holdout` share is their past (what
a policy may see, and what it must not recommend again), the rest is their
future: the items they will actually watch.

**Click model** (position-based model, Craswell et al. 2008): the item at
position j of a served list is clicked with probability
`examine(j) * attract(u, i)`, `examine(j) = 1 / (1 + j) ** eta`, `attract` =
`p_hit` for an item of the user's future and `p_miss` for any other. Clicks at
different positions are independent. A list whose items the user is about to
watch is clicked more, so a policy that predicts the held-out behaviour better
wins, and two arms with the same policy differ only by chance.

**Simulations** run at the level of click probabilities, not HTTP, so they
take seconds:

* `simulate_ab`: users arrive uniformly at random, each request is assigned by
  the real sticky hash, the arm's list is shown, clicks are drawn; exposure and
  click records (with request ids) go through the real `Attributor`, and
  `decide` is read every `peek_every` exposures, as an operator running
  `unirec rollout status` would. Returns the first decision and when it came.
* `false_win_rate`: repeated A/A experiments (one policy on both arms, a new
  salt per run) with the same peeking, vectorised over the per-user counts; the
  share of runs in which the treatment is ever declared the winner.

Policies are lists per user, precomputed: `popularity_lists` (most clicked
items of everyone's past) and `covisit_lists` (items co-clicked with the user's
recent past, the stronger one), both excluding what the user already clicked.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from unirec.data.split import user_histories
from unirec.ops import abstats as st
from unirec.ops import experiments as ex
from unirec.ops.config import ExperimentsConfig


@dataclass
class Population:
    users: list[str]
    items: list[str]                   # the catalogue; lists hold indices into it
    past: list[np.ndarray]             # per user: item indices before the cut, time order
    future: list[np.ndarray]           # per user: item indices after the cut (held out)

    def __len__(self) -> int:
        return len(self.users)


def population(events: Iterable[dict], *, holdout: float = 0.2, min_clicks: int = 5) -> Population:
    """Users of a click stream, each cut in time into past and held-out future."""
    hist = user_histories(events)
    items = sorted({i for h in hist.values() for i in h.item_ids}, key=lambda s: (len(s), s))
    index = {iid: j for j, iid in enumerate(items)}
    users, past, future = [], [], []
    for u in sorted(hist, key=lambda s: (len(s), s)):
        ids = [index[i] for i in hist[u].item_ids]
        if len(ids) < min_clicks:
            continue
        cut = len(ids) - max(1, round(holdout * len(ids)))
        users.append(u)
        past.append(np.array(ids[:cut], dtype=np.int64))
        future.append(np.unique(np.array(ids[cut:], dtype=np.int64)))
    return Population(users, items, past, future)


@dataclass(frozen=True)
class ClickModel:
    p_hit: float = 0.3        # attraction of an item from the user's held-out future
    p_miss: float = 0.01      # attraction of any other item
    eta: float = 1.0          # position bias exponent

    def probabilities(self, pop: Population, lists: np.ndarray) -> np.ndarray:
        """(U, k) click probability of each position of each user's list."""
        k = lists.shape[1]
        hit = np.stack([np.isin(lists[u], pop.future[u]) for u in range(len(pop))])
        return np.where(hit, self.p_hit, self.p_miss) / (1.0 + np.arange(k)) ** self.eta

    def any_click(self, pop: Population, lists: np.ndarray) -> np.ndarray:
        """(U,) probability that a user clicks at least one item of their list."""
        return 1.0 - np.prod(1.0 - self.probabilities(pop, lists), axis=1)


# ---------------------------------------------------------------- policies

def _top_unseen(scores: np.ndarray, seen: np.ndarray, k: int) -> np.ndarray:
    s = scores.astype(np.float64).copy()
    s[seen] = -np.inf
    top = np.argpartition(-s, k)[:k]
    return top[np.argsort(-s[top], kind="stable")]


def popularity_lists(pop: Population, k: int) -> np.ndarray:
    """(U, k): the most clicked items of everyone's past, minus the user's own."""
    counts = np.bincount(np.concatenate(pop.past), minlength=len(pop.items))
    return np.stack([_top_unseen(counts, pop.past[u], k) for u in range(len(pop))])


def covisit_lists(pop: Population, k: int, *, recent: int = 20) -> np.ndarray:
    """(U, k): items co-clicked (by other users' pasts) with the user's `recent` last items,
    each co-click count damped by the item's popularity (sqrt), minus the user's own."""
    n_items = len(pop.items)
    x = np.zeros((len(pop), n_items), dtype=np.float32)
    for u, p in enumerate(pop.past):
        x[u, p] = 1.0
    co = x.T @ x                                                  # (I, I) co-click counts
    np.fill_diagonal(co, 0.0)
    damp = 1.0 / np.sqrt(np.maximum(x.sum(0), 1.0))
    return np.stack([_top_unseen(co[pop.past[u][-recent:]].sum(0) * damp, pop.past[u], k)
                     for u in range(len(pop))])


# ---------------------------------------------------------------- simulations

@dataclass
class SimResult:
    decision: ex.Decision                # the first CTR decision (the experiment stops), or the last read
    decided_at: int | None               # exposures (both arms) when it came
    exposures: int
    stats: dict[str, ex.ArmStats]


def simulate_ab(pop: Population, lists: Mapping[str, np.ndarray], cfg: ExperimentsConfig, *, exposures: int,
                peek_every: int = 200, click_model: ClickModel = ClickModel(), seed: int = 0) -> SimResult:
    """One A/B experiment through the real assignment, attribution and decision (see module doc).

    `lists[arm]` is each arm's (U, k) item lists; arms and shares come from `cfg.arms`."""
    rng = np.random.default_rng(seed)
    exp = ex.experiment(cfg, {"versions": {a.name: "latest" for a in cfg.arms}})
    probs = {arm: click_model.probabilities(pop, lst) for arm, lst in lists.items()}
    att = ex.Attributor(exp.id, cfg.attribution_window_s)
    arm_of = [exp.assign(u).name for u in pop.users]
    control, treatment = exp.arms[0].name, exp.arms[1].name
    for t in range(exposures):
        u = int(rng.integers(len(pop)))
        arm = arm_of[u]
        shown = lists[arm][u]
        rid = f"sim-{seed}-{t}"
        att.add_exposure({"schema": ex.EXPOSURE_SCHEMA, "request_id": rid, "experiment": exp.id, "arm": arm,
                          "user_id": pop.users[u], "items": [pop.items[j] for j in shown], "ts": float(t)})
        for pos in np.flatnonzero(rng.random(len(shown)) < probs[arm][u]):
            att.add_click({"request_id": rid, "item_id": pop.items[shown[pos]], "ts": t + 0.5, "label": 1})
        if (t + 1) % peek_every == 0:
            d = ex.decide(att.arm(control), att.arm(treatment), cfg, arm=treatment)
            if d.verdict in ("treatment_wins", "control_wins", "no_difference"):
                return SimResult(d, t + 1, t + 1, att.stats)
    last = ex.decide(att.arm(control), att.arm(treatment), cfg, arm=treatment)
    return SimResult(last, None, exposures, att.stats)


def false_win_rate(pop: Population, lists: np.ndarray, cfg: ExperimentsConfig, *, runs: int, exposures: int,
                   peek_every: int = 200, click_model: ClickModel = ClickModel(), seed: int = 0
                   ) -> tuple[float, list[int]]:
    """Repeated A/A runs (same lists on both arms, salt varied per run): the share of runs
    in which the treatment is declared the winner, and those runs' indices. A run ends
    at its first decision (sequential: at any peek; fixed: the first read at the
    horizon, so give `exposures` comfortably above two horizons).

    Same statistics as `decide` (per-user counts -> `abstats.ratio_variance` -> `ctr_test`),
    vectorised: a clicked exposure is one Bernoulli draw of the user's any-click probability."""
    rng = np.random.default_rng(seed)
    p_any = click_model.any_click(pop, lists)
    shares = [(a.name, a.share) for a in cfg.arms[:2]]
    wins = []
    for r in range(runs):
        salt = f"{cfg.salt}/aa-{r}"
        treated = np.array([ex.assign(u, salt, shares) == shares[1][0] for u in pop.users])
        users = rng.integers(len(pop), size=exposures)
        clicked = rng.random(exposures) < p_any[users]
        n_u = np.zeros(len(pop))
        c_u = np.zeros(len(pop))
        for start in range(0, exposures, peek_every):
            chunk = slice(start, min(start + peek_every, exposures))
            np.add.at(n_u, users[chunk], 1.0)
            np.add.at(c_u, users[chunk], clicked[chunk].astype(float))
            arms = []
            for mask in (~treated, treated):
                seen = mask & (n_u > 0)
                arms.append(st.Proportion(int(n_u[seen].sum()), int(c_u[seen].sum()),
                                          st.ratio_variance(c_u[seen], n_u[seen])))
            verdict = ex.ctr_test(arms[0], arms[1], cfg).verdict
            if verdict == "treatment_wins":
                wins.append(r)
            if verdict in ("treatment_wins", "control_wins", "no_difference"):   # the experiment ends
                break
    return len(wins) / runs, wins
