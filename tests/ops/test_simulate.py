"""Simulated rollouts on held-out MovieLens-100k behaviour: a better treatment wins within a
stated number of exposures; repeated A/A runs keep the false-win rate at or below alpha."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from unirec.ops import abstats as st
from unirec.ops import experiments as ex
from unirec.ops import simulate as sim
from unirec.ops.config import ArmConfig, ExperimentsConfig

CACHE = Path(__file__).resolve().parents[2] / ".cache" / "unirec"
CFG = ExperimentsConfig(arms=(ArmConfig("control", "latest", 0.5), ArmConfig("treatment", "latest", 0.5)),
                        alpha=0.05, tau=0.03, min_exposures=200)
WIN_WITHIN = 6000     # exposures (both arms) by which the better treatment must have won


@pytest.fixture(scope="module")
def ml100k():
    """The population of real ML-100k users (RecBole wheel; network on the first run only)."""
    from unirec.data import load_events, prepare
    from unirec.data.config import DataConfig

    pop = sim.population(load_events(prepare(DataConfig(cache_dir=str(CACHE)))))
    return pop, sim.popularity_lists(pop, 10), sim.covisit_lists(pop, 10)


def tiny_population():
    events = [{"schema": "click/v1", "user_id": u, "item_id": i, "ts": t, "label": 1}
              for u, items in {"u1": "abcdefghij", "u2": "abcdeklmno", "u3": "fghijklmno"}.items()
              for t, i in enumerate(items)]
    return sim.population(events, holdout=0.2)


def test_population_cuts_each_user_in_time_and_policies_never_repeat_the_past():
    pop = tiny_population()
    assert len(pop) == 3 and [len(p) for p in pop.past] == [8, 8, 8] and [len(f) for f in pop.future] == [2, 2, 2]
    assert [pop.items[j] for j in pop.future[0]] == ["i", "j"]
    for lists in (sim.popularity_lists(pop, 3), sim.covisit_lists(pop, 3)):
        for u in range(3):
            assert not set(lists[u]) & set(pop.past[u])


def test_click_model_prefers_the_users_future_and_the_top_positions():
    pop = tiny_population()
    future = np.stack([np.concatenate([f, [0]]) for f in pop.future])     # 2 future items then a past one
    p = sim.ClickModel(p_hit=0.4, p_miss=0.01, eta=1.0).probabilities(pop, future)
    np.testing.assert_allclose(p[0], [0.4, 0.2, 0.01 / 3])
    assert sim.ClickModel().any_click(pop, future).min() > sim.ClickModel().any_click(pop, future[:, ::-1]).max()


@pytest.mark.integration
def test_the_better_list_is_the_better_list(ml100k):
    """Sanity of the scenario: co-visitation predicts held-out behaviour better than popularity."""
    pop, popular, covisit = ml100k
    cm = sim.ClickModel()
    assert cm.any_click(pop, covisit).mean() > 1.3 * cm.any_click(pop, popular).mean()


@pytest.mark.integration
@pytest.mark.parametrize("seed", range(5))
def test_a_better_treatment_wins_within_the_stated_exposures(ml100k, seed):
    pop, popular, covisit = ml100k
    r = sim.simulate_ab(pop, {"control": popular, "treatment": covisit}, CFG, exposures=20000, seed=seed)
    assert r.decision.verdict == "treatment_wins" and r.decided_at <= WIN_WITHIN, (r.decision, r.decided_at)
    assert r.decision.ci[0] > 0                                             # the interval excludes no effect
    assert r.stats["treatment"].ndcg > r.stats["control"].ndcg


@pytest.mark.integration
def test_a_worse_treatment_is_not_declared_the_winner(ml100k):
    pop, popular, covisit = ml100k
    r = sim.simulate_ab(pop, {"control": covisit, "treatment": popular}, CFG, exposures=20000, seed=1)
    assert r.decision.verdict == "control_wins"


@pytest.mark.integration
@pytest.mark.parametrize("test,peek_every,exposures", [("sequential", 200, 10000), ("fixed", 200, 12000)])
def test_repeated_aa_runs_keep_the_false_win_rate_at_or_below_alpha(ml100k, test, peek_every, exposures):
    """200 A/A runs, status read every 200 exposures (sequential: acting on any read;
    fixed: read at the horizon of 5000 exposures per arm)."""
    pop, popular, _ = ml100k
    cfg = dataclasses.replace(CFG, test=test, horizon=5000)
    rate, wins = sim.false_win_rate(pop, popular, cfg, runs=200, exposures=exposures, peek_every=peek_every, seed=3)
    assert rate <= cfg.alpha, wins


@pytest.mark.integration
def test_lists_as_independent_trials_would_fail_the_aa_test(ml100k):
    """Why the tests use user-clustered variances: with the binomial variance the same A/A
    runs declare far more false winners than alpha (users keep their arm, lists correlate)."""
    pop, popular, _ = ml100k
    p_any = sim.ClickModel().any_click(pop, popular)
    rng = np.random.default_rng(0)
    z_binomial, z_clustered = [], []
    for r in range(100):
        treated = np.array([ex.assign(u, f"s{r}", [("c", 0.5), ("t", 0.5)]) == "t" for u in pop.users])
        users = rng.integers(len(pop), size=20000)
        n_u = np.bincount(users, minlength=len(pop)).astype(float)
        c_u = np.bincount(users, weights=rng.random(len(users)) < p_any[users], minlength=len(pop))
        arms = [(n_u[m].sum(), c_u[m].sum(), st.ratio_variance(c_u[m & (n_u > 0)], n_u[m & (n_u > 0)]))
                for m in (~treated, treated)]
        binom = [st.Proportion(int(n), int(c), c / n * (1 - c / n) / n) for n, c, _ in arms]
        z_binomial.append(st.z_test(*binom)[0])
        z_clustered.append(st.z_test(*[st.Proportion(int(n), int(c), v) for n, c, v in arms])[0])
    assert np.std(z_binomial) > 1.5 and 0.8 < np.std(z_clustered) < 1.25
