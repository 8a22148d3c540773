// Certification statistics in double precision: incomplete beta and its inverse, Clopper-Pearson
// bounds, the two-sided binomial test and the standard normal quantile (no SciPy at run time).
#pragma once

#include <cstdint>

namespace mlx_robust {

/**
 * Stirling's error delta(z) = log Gamma(z + 1) - [(z + 1/2) log z - z + log sqrt(2 pi)], z > 0
 * (C. Loader, "Fast and Accurate Computation of Binomial Probabilities", 2000).
 */
double stirling_error(double z);

/**
 * Binomial deviance bd0(x, m) = x log(x / m) + m - x (x >= 0, m > 0), computed without
 * cancellation when x is close to m (Loader 2000).
 */
double binomial_deviance(double x, double m);

/**
 * log of the binomial "density" Gamma(n + 1) / (Gamma(k + 1) Gamma(n - k + 1)) p^k (1 - p)^(n - k)
 * for real 0 <= k <= n and 0 <= p <= 1, with Loader's saddle-point form (relative error ~1e-15
 * even for n ~ 1e9). Returns -inf where the value is 0.
 */
double log_binomial_pmf(double k, double n, double p);

/**
 * Regularized incomplete beta I_x(a, b) (lower tail of Beta(a, b) at x), a, b > 0, 0 <= x <= 1.
 * Continued fraction with the modified Lentz method; the tail that converges is evaluated and
 * complemented, so the result is accurate to a few ulp relative in the tail it is asked for.
 */
double betainc(double a, double b, double x);

/** Upper tail 1 - I_x(a, b) = I_{1 - x}(b, a), accurate when small. */
double betainc_upper(double a, double b, double x);

/**
 * Inverse of the regularized incomplete beta: x in [0, 1] with I_x(a, b) = p, 0 <= p <= 1.
 * Newton on the log of the smaller tail, safeguarded by bisection inside a shrinking bracket;
 * closed forms for a == 1 and b == 1. Throws std::invalid_argument for bad arguments.
 */
double betaincinv(double a, double b, double p);

/**
 * One-sided Clopper-Pearson lower confidence bound for a binomial proportion: the largest p0 with
 * P(X >= k | n, p0) <= alpha, i.e. the alpha-quantile of Beta(k, n - k + 1); 0 when k == 0 and
 * alpha^(1/n) when k == n. Holds with probability >= 1 - alpha (Clopper & Pearson 1934; used by
 * CERTIFY in Cohen, Rosenfeld & Kolter 2019, https://arxiv.org/abs/1902.02918).
 */
double clopper_pearson_lower(int64_t k, int64_t n, double alpha);

/** One-sided Clopper-Pearson upper bound: the (1 - alpha)-quantile of Beta(k + 1, n - k); 1 when k == n. */
double clopper_pearson_upper(int64_t k, int64_t n, double alpha);

/** Binomial CDF P(X <= k) for X ~ Binomial(n, p). */
double binomial_cdf(int64_t k, int64_t n, double p);

/** Binomial survival function P(X > k) for X ~ Binomial(n, p), accurate when small. */
double binomial_sf(int64_t k, int64_t n, double p);

/**
 * Two-sided exact binomial test p-value of k successes in n trials against success probability p,
 * as scipy.stats.binomtest(k, n, p).pvalue: the probability of outcomes no more likely than k
 * (relative tolerance 1e-7 on the comparison, as SciPy and R do). PREDICT abstains when the test of
 * the top two counts (k = nA, n = nA + nB, p = 1/2) gives a p-value > alpha (Cohen et al. 2019).
 */
double binomial_test_pvalue(int64_t k, int64_t n, double p = 0.5);

/**
 * Standard normal quantile Phi^-1(p), 0 < p < 1 (Wichura, Algorithm AS 241 PPND16, 1988;
 * ~1e-16 relative); -inf / +inf at p = 0 / 1.
 */
double normal_ppf(double p);

/** Standard normal CDF Phi(x) = erfc(-x / sqrt 2) / 2. */
double normal_cdf(double x);

} // namespace mlx_robust
