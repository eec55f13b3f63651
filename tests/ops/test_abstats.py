"""A/B statistics against hand computations: z-test, mSPRT, confidence sequence, clustered variance."""
from __future__ import annotations

import math

import numpy as np
import pytest

from unirec.ops import abstats as st


def test_z_test_and_msprt_match_hand_computation():
    a, b = st.Proportion(1000, 100, 0.1 * 0.9 / 1000), st.Proportion(1000, 130, 0.13 * 0.87 / 1000)
    v = a.var + b.var
    z, p = st.z_test(a, b)
    assert z == pytest.approx(0.03 / math.sqrt(v)) and p == pytest.approx(math.erfc(z / math.sqrt(2)))
    tau = 0.03
    lam = math.sqrt(v / (v + tau ** 2)) * math.exp(0.03 ** 2 * tau ** 2 / (2 * v * (v + tau ** 2)))
    assert st.msprt(a, b, tau) == pytest.approx(lam)
    lo, hi = st.confidence_sequence(a, b, tau, 0.05)
    assert lo < 0.03 < hi and (hi - lo) > 2 * 1.96 * math.sqrt(v)   # wider than the fixed-horizon interval
    assert st.norm_ppf(0.975) == pytest.approx(1.959964, abs=1e-5)


def test_ratio_variance_counts_users_not_lists():
    """One heavy user carrying all the clicks: far more uncertain than 1000 independent lists."""
    clicked = np.array([100.0] + [0.0] * 9)
    exposures = np.array([100.0] * 10)
    binom = 0.1 * 0.9 / 1000
    assert st.ratio_variance(clicked, exposures) > 5 * binom
    assert st.ratio_variance(np.full(10, 10.0), exposures) == pytest.approx(binom)   # no spread: binomial floor
