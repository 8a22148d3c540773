#include "defences/stats.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace mlx_robust {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kLnSqrt2Pi = 0.918938533204672741780329736406;  // log(sqrt(2 pi))
constexpr double kLn2Pi = 1.837877066409345483560659472811;      // log(2 pi)

// Numbers in messages via snprintf: an exception message built with std::ostringstream crashed
// the in-place build against the mlx-cuda wheel (measured on an H200 with g++ 13).
std::string str(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.17g", v);
  return buf;
}

[[noreturn]] void fail(const char* fn, const std::string& what) {
  throw std::invalid_argument(std::string("[") + fn + "] " + what);
}

void check_unit(const char* fn, const char* name, double v, bool open) {
  bool ok = open ? (v > 0.0 && v < 1.0) : (v >= 0.0 && v <= 1.0);
  if (!ok) {
    fail(fn, std::string(name) + (open ? " must be in (0, 1), got " : " must be in [0, 1], got ") + str(v));
  }
}

void check_counts(const char* fn, int64_t k, int64_t n) {
  if (n < 1) {
    fail(fn, "n must be >= 1, got " + std::to_string(n));
  }
  if (k < 0 || k > n) {
    fail(fn, "k must be in [0, n] = [0, " + std::to_string(n) + "], got " + std::to_string(k));
  }
}

void check_shape_params(const char* fn, double a, double b) {
  if (!(a > 0.0 && std::isfinite(a)) || !(b > 0.0 && std::isfinite(b))) {
    fail(fn, "a and b must be finite and > 0, got a=" + str(a) + ", b=" + str(b));
  }
}

// log(1 - exp(t)) for t <= 0 without cancellation (Maechler 2012).
double log1mexp(double t) {
  return t > -M_LN2 ? std::log(-std::expm1(t)) : std::log1p(-std::exp(t));
}

// log of the binomial density with both p and q = 1 - p given, so neither is rounded twice.
double log_pmf(double k, double n, double p, double q) {
  if (p == 0.0) {
    return k == 0.0 ? 0.0 : -kInf;
  }
  if (q == 0.0) {
    return k == n ? 0.0 : -kInf;
  }
  if (k == 0.0) {
    return p < 0.1 ? -binomial_deviance(n, n * q) - n * p : n * std::log(q);
  }
  if (k == n) {
    return q < 0.1 ? -binomial_deviance(n, n * p) - n * q : n * std::log(p);
  }
  if (k < 0.0 || k > n) {
    return -kInf;
  }
  double lc = stirling_error(n) - stirling_error(k) - stirling_error(n - k) -
      binomial_deviance(k, n * p) - binomial_deviance(n - k, n * q);
  double lf = kLn2Pi + std::log(k) + std::log1p(-k / n);
  return lc - 0.5 * lf;
}

// log( x^a y^b / (a B(a, b)) ), y = 1 - x: the factor in front of the continued fraction.
double log_front(double a, double b, double x, double y) {
  return log_pmf(a, a + b, x, y) + std::log(b / (a + b));
}

// log of the Beta(a, b) density at x (0 < x < 1), y = 1 - x.
double log_density(double a, double b, double x, double y) {
  return log_pmf(a, a + b, x, y) + std::log(a / (a + b) * b) - std::log(x) - std::log(y);
}

// Continued fraction of I_x(a, b) (modified Lentz); converges fast for x < (a + 1) / (a + b + 2)
// and in O(sqrt(max(a, b))) terms near the mean. y = 1 - x, exact, for the first denominator.
double beta_cf(double a, double b, double x, double y) {
  constexpr double tiny = 1e-300;
  constexpr long max_terms = 20'000'000;
  const double qab = a + b, qap = a + 1.0, qam = a - 1.0;
  double c = 1.0;
  // 1 - (a + b) x / (a + 1); near x = 1 with a >> b, as ((1 - b) + (a + b) y) / (a + 1), whose
  // terms are small there, so the cancellation costs nothing.
  double d = std::fabs(1.0 - b) + qab * y < qap ? ((1.0 - b) + qab * y) / qap : 1.0 - qab * x / qap;
  if (std::fabs(d) < tiny) {
    d = tiny;
  }
  d = 1.0 / d;
  double h = d;
  for (long m = 1; m <= max_terms; ++m) {
    const double dm = static_cast<double>(m), m2 = 2.0 * dm;
    double aa = dm * (b - dm) * x / ((qam + m2) * (a + m2));
    d = 1.0 + aa * d;
    if (std::fabs(d) < tiny) {
      d = tiny;
    }
    c = 1.0 + aa / c;
    if (std::fabs(c) < tiny) {
      c = tiny;
    }
    d = 1.0 / d;
    h *= d * c;
    aa = -(a + dm) * (qab + dm) * x / ((a + m2) * (qap + m2));
    d = 1.0 + aa * d;
    if (std::fabs(d) < tiny) {
      d = tiny;
    }
    c = 1.0 + aa / c;
    if (std::fabs(c) < tiny) {
      c = tiny;
    }
    d = 1.0 / d;
    const double del = d * c;
    h *= del;
    if (std::fabs(del - 1.0) < 1e-16) {
      break;
    }
  }
  return h;
}

// log of the lower (upper = false) or upper tail of Beta(a, b) at x, y = 1 - x.
double log_beta_tail(double a, double b, double x, double y, bool upper) {
  if (x <= 0.0) {
    return upper ? 0.0 : -kInf;
  }
  if (y <= 0.0) {
    return upper ? -kInf : 0.0;
  }
  if (x < (a + 1.0) / (a + b + 2.0)) {
    double lower = log_front(a, b, x, y) + std::log(beta_cf(a, b, x, y));
    return upper ? log1mexp(std::min(lower, 0.0)) : lower;
  }
  double up = log_front(b, a, y, x) + std::log(beta_cf(b, a, y, x));
  return upper ? up : log1mexp(std::min(up, 0.0));
}

// Abramowitz & Stegun 26.5.22-style starting point (as in Numerical Recipes' invbetai).
double initial_guess(double a, double b, double p) {
  double x;
  if (a >= 1.0 && b >= 1.0) {
    double pp = p < 0.5 ? p : 1.0 - p;
    double t = std::sqrt(-2.0 * std::log(pp));
    x = (2.30753 + t * 0.27061) / (1.0 + t * (0.99229 + t * 0.04481)) - t;
    if (p < 0.5) {
      x = -x;
    }
    double al = (x * x - 3.0) / 6.0;
    double h = 2.0 / (1.0 / (2.0 * a - 1.0) + 1.0 / (2.0 * b - 1.0));
    double w = x * std::sqrt(al + h) / h -
        (1.0 / (2.0 * b - 1.0) - 1.0 / (2.0 * a - 1.0)) * (al + 5.0 / 6.0 - 2.0 / (3.0 * h));
    x = a / (a + b * std::exp(2.0 * w));
  } else {
    double lna = std::log(a / (a + b)), lnb = std::log(b / (a + b));
    double t = std::exp(a * lna) / a, u = std::exp(b * lnb) / b, w = t + u;
    x = p < t / w ? std::pow(a * w * p, 1.0 / a) : 1.0 - std::pow(b * w * (1.0 - p), 1.0 / b);
  }
  return (x > 0.0 && x < 1.0) ? x : 0.5;
}

// Index i in [lo, hi] with f(i) <= d < f(i + 1) for f ascending (scipy's binomtest search).
template <typename F>
int64_t binom_search(const F& f, double d, int64_t lo, int64_t hi) {
  while (lo < hi) {
    int64_t mid = lo + (hi - lo) / 2;
    double v = f(mid);
    if (v < d) {
      lo = mid + 1;
    } else if (v > d) {
      hi = mid - 1;
    } else {
      return mid;
    }
  }
  return f(lo) <= d ? lo : lo - 1;
}

} // namespace

double stirling_error(double z) {
  if (z <= 15.0) {
    return std::lgamma(z + 1.0) - (z + 0.5) * std::log(z) + z - kLnSqrt2Pi;
  }
  constexpr double s0 = 1.0 / 12, s1 = 1.0 / 360, s2 = 1.0 / 1260, s3 = 1.0 / 1680, s4 = 1.0 / 1188;
  const double zz = z * z;
  if (z > 500) {
    return (s0 - s1 / zz) / z;
  }
  if (z > 80) {
    return (s0 - (s1 - s2 / zz) / zz) / z;
  }
  if (z > 35) {
    return (s0 - (s1 - (s2 - s3 / zz) / zz) / zz) / z;
  }
  return (s0 - (s1 - (s2 - (s3 - s4 / zz) / zz) / zz) / zz) / z;
}

double binomial_deviance(double x, double m) {
  if (std::fabs(x - m) < 0.1 * (x + m)) {
    double v = (x - m) / (x + m);
    double s = (x - m) * v;
    double ej = 2.0 * x * v;
    v *= v;
    for (int j = 1; j < 1000; ++j) {
      ej *= v;
      double s1 = s + ej / (2 * j + 1);
      if (s1 == s) {
        return s1;
      }
      s = s1;
    }
    return s;
  }
  return x * std::log(x / m) + m - x;
}

double log_binomial_pmf(double k, double n, double p) {
  if (!(n >= 0.0) || !std::isfinite(n)) {
    fail("log_binomial_pmf", "n must be finite and >= 0, got " + str(n));
  }
  check_unit("log_binomial_pmf", "p", p, false);
  return log_pmf(k, n, p, 1.0 - p);
}

double betainc(double a, double b, double x) {
  check_shape_params("betainc", a, b);
  check_unit("betainc", "x", x, false);
  return std::exp(log_beta_tail(a, b, x, 1.0 - x, false));
}

double betainc_upper(double a, double b, double x) {
  check_shape_params("betainc_upper", a, b);
  check_unit("betainc_upper", "x", x, false);
  return std::exp(log_beta_tail(a, b, x, 1.0 - x, true));
}

double betaincinv(double a, double b, double p) {
  check_shape_params("betaincinv", a, b);
  check_unit("betaincinv", "p", p, false);
  if (p == 0.0 || p == 1.0) {
    return p;
  }
  if (b == 1.0) {
    return std::exp(std::log(p) / a);  // I_x(a, 1) = x^a
  }
  if (a == 1.0) {
    return -std::expm1(std::log1p(-p) / b);  // I_x(1, b) = 1 - (1 - x)^b
  }
  // Match the log of the smaller tail: relative accuracy where it matters (alpha ~ 1e-3 or less).
  const bool upper = p > 0.5;
  const double target = upper ? std::log1p(-p) : std::log(p);
  double lo = 0.0, hi = 1.0;
  double x = initial_guess(a, b, p);
  for (int it = 0; it < 400; ++it) {
    const double y = 1.0 - x;
    const double g = log_beta_tail(a, b, x, y, upper) - target;
    if (g == 0.0) {
      return x;
    }
    // The lower tail grows with x, the upper one shrinks.
    if ((g < 0.0) != upper) {
      lo = x;
    } else {
      hi = x;
    }
    const double slope = std::exp(log_density(a, b, x, y) - (g + target)) * (upper ? -1.0 : 1.0);
    double next = x - g / slope;
    if (!(next > lo && next < hi) || !std::isfinite(next)) {
      if (lo == 0.0) {
        next = hi * 0.0625;
      } else if (hi == 1.0) {
        next = 1.0 - (1.0 - lo) * 0.0625;
      } else {
        next = hi / lo > 16.0 ? std::sqrt(lo * hi) : 0.5 * (lo + hi);
      }
    }
    if (std::fabs(next - x) <= 1e-15 * next || hi - lo <= 1e-16 * hi) {
      return next;
    }
    x = next;
  }
  return x;
}

double clopper_pearson_lower(int64_t k, int64_t n, double alpha) {
  check_counts("clopper_pearson_lower", k, n);
  check_unit("clopper_pearson_lower", "alpha", alpha, true);
  if (k == 0) {
    return 0.0;
  }
  return betaincinv(static_cast<double>(k), static_cast<double>(n - k + 1), alpha);
}

double clopper_pearson_upper(int64_t k, int64_t n, double alpha) {
  check_counts("clopper_pearson_upper", k, n);
  check_unit("clopper_pearson_upper", "alpha", alpha, true);
  if (k == n) {
    return 1.0;
  }
  // The (1 - alpha)-quantile of Beta(k + 1, n - k) is 1 - (alpha-quantile of Beta(n - k, k + 1)).
  return 1.0 - betaincinv(static_cast<double>(n - k), static_cast<double>(k + 1), alpha);
}

double binomial_cdf(int64_t k, int64_t n, double p) {
  if (n < 0) {
    fail("binomial_cdf", "n must be >= 0, got " + std::to_string(n));
  }
  check_unit("binomial_cdf", "p", p, false);
  if (k < 0) {
    return 0.0;
  }
  if (k >= n) {
    return 1.0;
  }
  // P(X <= k) = 1 - I_p(k + 1, n - k)
  return std::exp(log_beta_tail(static_cast<double>(k + 1), static_cast<double>(n - k), p, 1.0 - p, true));
}

double binomial_sf(int64_t k, int64_t n, double p) {
  if (n < 0) {
    fail("binomial_sf", "n must be >= 0, got " + std::to_string(n));
  }
  check_unit("binomial_sf", "p", p, false);
  if (k < 0) {
    return 1.0;
  }
  if (k >= n) {
    return 0.0;
  }
  return std::exp(log_beta_tail(static_cast<double>(k + 1), static_cast<double>(n - k), p, 1.0 - p, false));
}

double binomial_test_pvalue(int64_t k, int64_t n, double p) {
  check_counts("binomial_test_pvalue", k, n);
  check_unit("binomial_test_pvalue", "p", p, false);
  const double pn = p * static_cast<double>(n);
  if (static_cast<double>(k) == pn) {
    return 1.0;
  }
  const double q = 1.0 - p, dn = static_cast<double>(n);
  auto lpmf = [&](int64_t j) { return log_pmf(static_cast<double>(j), dn, p, q); };
  // Compare log densities: no underflow for large n (SciPy compares the densities themselves).
  const double ld = lpmf(k) + std::log1p(1e-7);
  double pval;
  if (static_cast<double>(k) < pn) {
    auto neg = [&](int64_t j) { return -lpmf(j); };
    int64_t ix = binom_search(neg, -ld, static_cast<int64_t>(std::ceil(pn)), n);
    int64_t y = n - ix + (ld == lpmf(ix) ? 1 : 0);
    pval = binomial_cdf(k, n, p) + binomial_sf(n - y, n, p);
  } else {
    int64_t ix = binom_search(lpmf, ld, 0, static_cast<int64_t>(std::floor(pn)));
    int64_t y = ix + 1;
    pval = binomial_cdf(y - 1, n, p) + binomial_sf(k - 1, n, p);
  }
  return std::min(1.0, pval);
}

double normal_ppf(double p) {
  if (!(p >= 0.0 && p <= 1.0)) {
    fail("normal_ppf", "p must be in [0, 1], got " + str(p));
  }
  if (p == 0.0) {
    return -kInf;
  }
  if (p == 1.0) {
    return kInf;
  }
  const double q = p - 0.5;
  if (std::fabs(q) <= 0.425) {
    const double r = 0.180625 - q * q;
    return q *
        (((((((r * 2509.0809287301226727 + 33430.575583588128105) * r + 67265.770927008700853) * r +
             45921.953931549871457) * r + 13731.693765509461125) * r + 1971.5909503065514427) * r +
          133.14166789178437745) * r + 3.387132872796366608) /
        (((((((r * 5226.495278852545925 + 28729.085735721942674) * r + 39307.89580009271061) * r +
             21213.794301586595867) * r + 5394.1960214247511077) * r + 687.1870074920579083) * r +
          42.313330701600911252) * r + 1.0);
  }
  double r = std::sqrt(-std::log(q < 0.0 ? p : 1.0 - p));
  double val;
  if (r <= 5.0) {
    r -= 1.6;
    val = (((((((r * 7.7454501427834140764e-4 + 0.0227238449892691845833) * r +
                0.24178072517745061177) * r + 1.27045825245236838258) * r +
              3.64784832476320460504) * r + 5.7694972214606914055) * r + 4.6303378461565452959) * r +
           1.42343711074968357734) /
        (((((((r * 1.05075007164441684324e-9 + 5.475938084995344946e-4) * r +
              0.0151986665636164571966) * r + 0.14810397642748007459) * r +
            0.68976733498510000455) * r + 1.6763848301838038494) * r + 2.05319162663775882187) * r +
         1.0);
  } else {
    r -= 5.0;
    val = (((((((r * 2.01033439929228813265e-7 + 2.71155556874348757815e-5) * r +
                0.0012426609473880784386) * r + 0.026532189526576123093) * r +
              0.29656057182850489123) * r + 1.7848265399172913358) * r + 5.4637849111641143699) * r +
           6.6579046435011037772) /
        (((((((r * 2.04426310338993978564e-15 + 1.4215117583164458887e-7) * r +
              1.8463183175100546818e-5) * r + 7.868691311456132591e-4) * r +
            0.0148753612908506148525) * r + 0.13692988092273580531) * r +
          0.59983220655588793769) * r + 1.0);
  }
  return q < 0.0 ? -val : val;
}

double normal_cdf(double x) {
  return 0.5 * std::erfc(-x * M_SQRT1_2);
}

} // namespace mlx_robust
