"""Certification statistics in C++ (csrc/stats.h) against SciPy, to 1e-10 relative, n up to 1e7."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mlx_robust import _functional as F
from mlx_robust import smoothing as S

scipy_stats = pytest.importorskip("scipy.stats")
scipy_special = pytest.importorskip("scipy.special")

RTOL = 1e-10

NS = [1, 2, 3, 10, 99, 100, 1000, 12_345, 100_000, 1_000_000, 10_000_000]


def _ks(n):
    """Edges (0, 1, n - 1, n), the middle, and the high counts a certificate sees."""
    ks = {0, 1, 2, n // 3, n // 2, (n + 1) // 2, n - 2, n - 1, n, int(n * 0.99), int(n * 0.999)}
    return sorted(k for k in ks if 0 <= k <= n)


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


CP_CASES = [(k, n, a) for n in NS for k in _ks(n) for a in (1e-10, 1e-3, 0.01, 0.05, 0.25, 0.5)]


@pytest.mark.parametrize("n", NS)
def test_clopper_pearson_lower_matches_scipy(n):
    for k, nn, alpha in (c for c in CP_CASES if c[1] == n):
        got = S.clopper_pearson_lower(k, nn, alpha)
        want = 0.0 if k == 0 else scipy_stats.beta.ppf(alpha, k, nn - k + 1)
        assert _rel(got, want) < RTOL, (k, nn, alpha, got, want)


def test_clopper_pearson_lower_edges_are_closed_form():
    for n in NS:
        assert S.clopper_pearson_lower(0, n, 1e-3) == 0.0
        assert _rel(S.clopper_pearson_lower(n, n, 1e-3), 1e-3 ** (1 / n)) < 1e-14
    # The bound is a lower bound: below the point estimate, and growing with k.
    vals = [S.clopper_pearson_lower(k, 1000, 1e-3) for k in range(0, 1001, 50)]
    assert all(v <= k / 1000 for v, k in zip(vals, range(0, 1001, 50)))
    assert all(a < b for a, b in zip(vals, vals[1:]))


def test_clopper_pearson_upper_matches_scipy():
    for n in (1, 10, 1000, 10_000_000):
        for k in _ks(n):
            got = F.clopper_pearson_upper(k, n, 1e-3)
            want = 1.0 if k == n else scipy_stats.beta.ppf(1 - 1e-3, k + 1, n - k)
            assert abs(got - want) <= 1e-10 * max(want, 1e-300) + 1e-15, (k, n, got, want)


@pytest.mark.parametrize("n", NS)
def test_binomial_test_matches_scipy(n):
    for k in _ks(n):
        got = S.binomial_test_pvalue(k, n)
        want = scipy_stats.binomtest(k, n, 0.5).pvalue
        if want < 1e-290:  # both underflow: 2 * 0.5**n for n = 1e7
            assert got < 1e-290
        else:
            assert _rel(got, want) < RTOL, (k, n, got, want)


@pytest.mark.parametrize("p", [0.1, 0.3, 0.77])
def test_binomial_test_other_p_matches_scipy(p):
    for n in (5, 37, 1000, 54_321):
        for k in _ks(n):
            got = S.binomial_test_pvalue(k, n, p)
            want = scipy_stats.binomtest(k, n, p).pvalue
            assert got == want or (want < 1e-290 and got < 1e-290) or _rel(got, want) < RTOL, (k, n, p, got, want)


def test_binomial_test_random_cases_match_scipy():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(np.exp(rng.uniform(0, math.log(1e7))))
        k = int(rng.integers(0, n + 1))
        got, want = S.binomial_test_pvalue(k, n), scipy_stats.binomtest(k, n).pvalue
        assert (want < 1e-290 and got < 1e-290) or _rel(got, want) < RTOL, (k, n, got, want)


def test_clopper_pearson_random_cases_match_scipy():
    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(np.exp(rng.uniform(0, math.log(1e7))))
        k = int(rng.integers(0, n + 1))
        alpha = float(np.exp(rng.uniform(math.log(1e-12), math.log(0.5))))
        want = 0.0 if k == 0 else scipy_stats.beta.ppf(alpha, k, n - k + 1)
        assert _rel(S.clopper_pearson_lower(k, n, alpha), want) < RTOL, (k, n, alpha)


@pytest.mark.parametrize(
    "p",
    [1e-300, 1e-100, 1e-20, 1e-10, 1e-5, 1e-3, 0.02425, 0.1, 0.3, 0.5, 0.5 + 1e-12, 0.7, 0.9, 0.975,
     0.999, 1 - 1e-10, 1 - 1e-15],
)
def test_normal_ppf_matches_scipy(p):
    want = scipy_stats.norm.ppf(p)
    got = S.normal_ppf(p)
    assert got == want or _rel(got, want) < RTOL


def test_normal_ppf_limits_and_cdf_roundtrip():
    assert S.normal_ppf(0.0) == -math.inf and S.normal_ppf(1.0) == math.inf
    assert S.normal_ppf(0.5) == 0.0
    # Round trip in the lower tail, where Phi(x) keeps full relative precision; symmetry above.
    for x in np.linspace(-30, 0, 31):
        assert abs(S.normal_ppf(F.normal_cdf(float(x))) - x) <= 1e-12 * max(1.0, abs(x))
    for p in (1e-12, 1e-3, 0.25):
        assert S.normal_ppf(1 - p) == pytest.approx(-S.normal_ppf(p), rel=1e-12 / p)


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (1, 1), (2, 3), (1, 1e6), (1e6, 1), (20, 1e4), (5e3, 5e3), (3e6, 7e6)])
def test_betainc_and_inverse_match_scipy(a, b):
    mean = a / (a + b)
    sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    for x in sorted({max(1e-12, mean - 5 * sd), max(1e-12, mean - sd), mean, min(1 - 1e-12, mean + sd), 0.5}):
        want = scipy_special.betainc(a, b, x)
        if want > 1e-280:
            assert _rel(F.betainc(a, b, x), want) < 1e-9, (a, b, x)
    for p in (1e-8, 1e-3, 0.3, 0.5):
        want = scipy_special.betaincinv(a, b, p)
        assert _rel(F.betaincinv(a, b, p), want) < RTOL, (a, b, p)


BAD = [
    (S.clopper_pearson_lower, (5, 0, 0.01), "n must be >= 1"),
    (S.clopper_pearson_lower, (-1, 10, 0.01), "k must be in"),
    (S.clopper_pearson_lower, (11, 10, 0.01), "k must be in"),
    (S.clopper_pearson_lower, (5, 10, 0.0), "alpha must be in (0, 1)"),
    (S.clopper_pearson_lower, (5, 10, 1.0), "alpha must be in (0, 1)"),
    (S.clopper_pearson_lower, (5, 10, float("nan")), "alpha must be in (0, 1)"),
    (S.binomial_test_pvalue, (3, 2), "k must be in"),
    (S.binomial_test_pvalue, (1, 0), "n must be >= 1"),
    (S.binomial_test_pvalue, (1, 2, 1.5), "p must be in [0, 1]"),
    (S.normal_ppf, (1.5,), "p must be in [0, 1]"),
    (S.normal_ppf, (float("nan"),), "p must be in [0, 1]"),
    (F.betaincinv, (0.0, 1.0, 0.5), "a and b must be finite and > 0"),
    (F.betainc, (1.0, 1.0, 2.0), "x must be in [0, 1]"),
]


@pytest.mark.parametrize("fn,args,msg", BAD)
def test_bad_arguments_raise_value_error_naming_them(fn, args, msg):
    with pytest.raises(ValueError, match=re_escape(msg)):
        fn(*args)


def test_non_integer_counts_raise_type_error():
    with pytest.raises(TypeError, match="k must be an integer"):
        S.clopper_pearson_lower(2.5, 10, 0.01)
    with pytest.raises(TypeError, match="n must be an integer"):
        S.binomial_test_pvalue(2, True)


def re_escape(s: str) -> str:
    import re

    return re.escape(s)
