#include "core/geometry.h"

#include <stdexcept>
#include <string>

#include "core/errors.h"

namespace mlx_robust {

Norm parse_norm(const std::string& norm, const char* tag) {
  if (norm == "linf" || norm == "inf" || norm == "Linf") {
    return Norm::Linf;
  }
  if (norm == "l2" || norm == "L2") {
    return Norm::L2;
  }
  fail(tag, "norm", "must be 'linf' or 'l2'", "'" + norm + "'");
}

static std::vector<int> feature_axes(int ndim) {
  std::vector<int> axes;
  for (int i = 1; i < ndim; ++i) {
    axes.push_back(i);
  }
  return axes;
}

namespace {

// Shape checks shared by the public helpers: they are bound to Python and must never read past
// a shape (a rank-0 x or a mismatched eps would otherwise index out of bounds).
void check_batch_and_vector(const mx::array& x, const mx::array& v, const char* where, const char* vname) {
  if (x.ndim() < 1 || x.shape(0) < 1) {
    throw std::invalid_argument(std::string("[") + where + "] x must be a non-empty batch (N, ...)");
  }
  if (v.ndim() != 1 || v.shape(0) != x.shape(0)) {
    throw std::invalid_argument(std::string("[") + where + "] " + vname + " must have shape (N,) with N = x.shape[0]");
  }
  if (!mx::issubdtype(x.dtype(), mx::floating)) {
    throw std::invalid_argument(std::string("[") + where + "] x must be floating point");
  }
}

} // namespace

mx::array per_sample(const mx::array& v, int ndim) {
  mx::Shape shape(ndim, 1);
  shape[0] = v.shape(0);
  return mx::reshape(v, shape);
}

mx::array batch_norm_of(const mx::array& delta, Norm norm) {
  auto axes = feature_axes(delta.ndim());
  if (axes.empty()) {
    return mx::abs(delta);  // one feature per sample: both norms are |.|
  }
  if (norm == Norm::Linf) {
    return mx::max(mx::abs(delta), axes);
  }
  return mx::sqrt(mx::sum(mx::square(delta), axes));
}

mx::array ascent_step(const mx::array& x, const mx::array& grad, const mx::array& alpha, Norm norm) {
  check_batch_and_vector(x, alpha, "ascent_step", "alpha");
  if (grad.shape() != x.shape()) {
    throw std::invalid_argument("[ascent_step] grad must have the shape of x");
  }
  auto a = per_sample(alpha, x.ndim());
  if (norm == Norm::Linf) {
    return mx::add(x, mx::multiply(a, mx::sign(grad)));
  }
  auto gnorm = per_sample(batch_norm_of(grad, Norm::L2), x.ndim());
  auto unit = mx::divide(grad, mx::maximum(gnorm, mx::array(1e-12f)));
  return mx::add(x, mx::multiply(a, unit));
}

mx::array project(
    const mx::array& x,
    const mx::array& x0,
    const mx::array& eps,
    const mx::array& lo,
    const mx::array& hi,
    Norm norm) {
  check_batch_and_vector(x, eps, "project", "eps");
  if (x0.shape() != x.shape()) {
    throw std::invalid_argument("[project] x0 must have the shape of x");
  }
  auto e = per_sample(eps, x.ndim());
  auto delta = mx::subtract(x, x0);
  if (norm == Norm::Linf) {
    delta = mx::clip(delta, mx::negative(e), e);
  } else {
    auto dnorm = per_sample(batch_norm_of(delta, Norm::L2), x.ndim());
    auto factor = mx::minimum(mx::divide(e, mx::maximum(dnorm, mx::array(1e-12f))), mx::array(1.0f));
    delta = mx::multiply(delta, factor);
  }
  return mx::clip(mx::add(x0, delta), lo, hi);
}

mx::array random_start(
    const mx::array& x0,
    const mx::array& eps,
    const mx::array& lo,
    const mx::array& hi,
    Norm norm,
    const mx::array& key) {
  check_batch_and_vector(x0, eps, "random_start", "eps");
  if (key.ndim() != 1 || key.shape(0) != 2 || key.dtype() != mx::uint32) {
    throw std::invalid_argument("[random_start] key must be a PRNG key (2,) uint32");
  }
  mx::Shape sample_shape(x0.shape().begin() + 1, x0.shape().end());
  auto e = per_sample(eps, x0.ndim());
  mx::array delta(0.0f);
  if (norm == Norm::Linf) {
    delta = mx::random::uniform(
        mx::array(-1.0f), mx::array(1.0f), sample_shape, mx::float32, key);
  } else {
    auto keys = mx::random::split(key);
    auto g = mx::random::normal(sample_shape, mx::float32, 0.0f, 1.0f, keys.first);
    auto gnorm = mx::sqrt(mx::sum(mx::square(g)));
    auto d = static_cast<float>(g.size());
    auto u = mx::random::uniform(mx::array(0.0f), mx::array(1.0f), {}, mx::float32, keys.second);
    auto radius = mx::power(u, mx::array(1.0f / d));
    delta = mx::multiply(mx::divide(g, mx::maximum(gnorm, mx::array(1e-12f))), radius);
  }
  auto start = mx::add(x0, mx::multiply(e, mx::astype(delta, x0.dtype())));
  return mx::clip(start, lo, hi);
}

} // namespace mlx_robust
