"""The statistics behind `unirec rollout status` (see `unirec.ops.experiments` for the design):
user-clustered variance of a CTR, the two-proportion z-test and the normal-mixture SPRT
with its always-valid confidence sequence. Pure functions on counts; no scipy needed."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def ratio_variance(clicked: np.ndarray, exposures: np.ndarray) -> float:
    """Variance of sum(clicked) / sum(exposures) over users (delta method), floored at the
    binomial variance (clicks floored at half a click so that 0 and n clicks are not certain)."""
    n, c = float(exposures.sum()), float(clicked.sum())
    if n == 0:
        return math.inf
    p = min(max(c, 0.5), max(n - 0.5, 0.5)) / n
    binom = p * (1 - p) / n
    k = len(exposures)
    if k < 2:
        return binom
    r, mu = c / n, n / k
    cov = np.cov(np.vstack([clicked, exposures]).astype(np.float64), ddof=1)
    delta = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / (k * mu * mu)
    return max(float(delta), binom)


@dataclass(frozen=True)
class Proportion:
    n: int                # exposures
    c: int                # clicked exposures
    var: float            # variance of c / n (ratio_variance)

    @property
    def p(self) -> float:
        return self.c / self.n if self.n else 0.0


def norm_sf(z: float) -> float:
    """P(Z > z) for a standard normal."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def norm_ppf(p: float) -> float:
    """Inverse standard normal CDF (bisection; plenty for confidence levels)."""
    lo, hi = -40.0, 40.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1.0 - norm_sf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def z_test(a: Proportion, b: Proportion) -> tuple[float, float]:
    """Two-proportion z-test of B vs A with the arms' variances: (z, two-sided p)."""
    z = (b.p - a.p) / math.sqrt(a.var + b.var)
    return z, 2 * norm_sf(abs(z))


def msprt(a: Proportion, b: Proportion, tau: float) -> float:
    """The normal-mixture SPRT statistic Lambda of B vs A (see the module docstring)."""
    theta, v, t2 = b.p - a.p, a.var + b.var, tau * tau
    return math.sqrt(v / (v + t2)) * math.exp(min(700.0, theta * theta * t2 / (2 * v * (v + t2))))


def confidence_sequence(a: Proportion, b: Proportion, tau: float, alpha: float) -> tuple[float, float]:
    """Always-valid (1 - alpha) interval for CTR_b - CTR_a."""
    theta, v, t2 = b.p - a.p, a.var + b.var, tau * tau
    half = math.sqrt(v * (v + t2) / t2 * (2 * math.log(1 / alpha) + math.log((v + t2) / v)))
    return theta - half, theta + half
