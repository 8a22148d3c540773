#include "core/scoring.h"

#include <algorithm>
#include <limits>
#include <optional>
#include <stdexcept>

namespace mlx_robust {

void check_labels(const mx::array& y, int num_classes, const char* where, const char* name) {
  if (!mx::issubdtype(y.dtype(), mx::integer)) {
    throw std::invalid_argument(std::string("[") + where + "] " + name + " must hold integer class labels");
  }
  if (y.size() == 0) {
    return;
  }
  auto range = mx::astype(mx::stack({mx::min(y), mx::max(y)}), mx::int64);
  mx::eval(range);
  auto r = range.data<int64_t>();
  if (r[0] < 0 || r[1] >= num_classes) {
    throw std::invalid_argument(
        std::string("[") + where + "] " + name + " must lie in [0, " + std::to_string(num_classes) +
        "), got labels in [" + std::to_string(r[0]) + ", " + std::to_string(r[1]) + "]");
  }
}

namespace {

// (count of bad elements, the first bad element) of `values` where `bad` holds, as float32.
std::vector<mx::array> bad_facts(const mx::array& values, const mx::array& bad) {
  auto flat_bad = mx::reshape(bad, {-1});
  auto flat = mx::reshape(mx::astype(mx::broadcast_to(values, bad.shape()), mx::float32), {-1});
  auto first = mx::take(flat, mx::argmax(flat_bad), 0);
  return {mx::astype(mx::sum(flat_bad), mx::float32), first};
}

void require_vector(const char* tag, const mx::array& a, int n, const char* name, const char* of = "x") {
  if (a.ndim() != 1 || a.shape(0) != n) {
    throw std::invalid_argument(std::string("[") + tag + "] " + name + " must have shape (N,) matching " + of +
                                " (N = " + std::to_string(n) + "), got " + shape_string(a));
  }
}

void require_integer(const char* tag, const mx::array& a, const char* name) {
  if (!mx::issubdtype(a.dtype(), mx::integer)) {
    throw std::invalid_argument(std::string("[") + tag + "] " + name + " must hold integer class labels");
  }
}

void require_real(const char* tag, const mx::array& a, const char* name) {
  if (!mx::issubdtype(a.dtype(), mx::integer) && !mx::issubdtype(a.dtype(), mx::floating)) {
    throw std::invalid_argument(std::string("[") + tag + "] " + name + " must be a real number array");
  }
}

} // namespace

PendingInputChecks::PendingInputChecks(std::string tag, std::vector<std::string> what, mx::array facts, mx::array ranges)
    : tag_(std::move(tag)), what_(std::move(what)), facts_(std::move(facts)), ranges_(std::move(ranges)) {}

void PendingInputChecks::verify() const {
  mx::eval({facts_, ranges_});
  // Ranges first: [y_min, y_max, (target_min, target_max)], each against [0, num_classes).
  auto r = ranges_.data<int64_t>();
  auto f = facts_.data<float>();
  const int64_t c = r[0];
  int n_ranges = (static_cast<int>(ranges_.size()) - 1) / 2;
  for (int i = 0; i < n_ranges; ++i) {
    int64_t lo = r[1 + 2 * i], hi = r[2 + 2 * i];
    if (lo < 0 || hi >= c) {
      throw std::invalid_argument(
          "[" + tag_ + "] " + what_[i] + " must lie in [0, " + std::to_string(c) + "), got labels in [" +
          std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
  }
  for (size_t i = n_ranges; i < what_.size(); ++i) {
    size_t j = 2 * (i - n_ranges);
    if (f[j] > 0) {
      throw std::invalid_argument("[" + tag_ + "] " + what_[i] + ", got " + num_string(f[j]) +
                                  " bad value(s), e.g. " + num_string(f[j + 1]));
    }
  }
}

PendingInputChecks check_attack_inputs(const char* tag, const AttackInputs& in) {
  if (!in.x || !in.y || !in.lo || !in.hi) {
    throw std::invalid_argument(std::string("[") + tag + "] x, y, lo and hi are required");
  }
  const auto& x = *in.x;
  const auto& y = *in.y;
  if (x.ndim() < 2 || x.shape(0) < 1 || x.size() == 0) {
    throw std::invalid_argument(std::string("[") + tag + "] x must be a non-empty batch of rank >= 2, got shape " +
                                shape_string(x));
  }
  if (!mx::issubdtype(x.dtype(), mx::floating)) {
    throw std::invalid_argument(std::string("[") + tag + "] x must be floating point");
  }
  const int n = x.shape(0);
  require_vector(tag, y, n, in.y_name);
  require_integer(tag, y, in.y_name);
  if (in.num_classes < 2) {
    throw std::invalid_argument(std::string("[") + tag + "] num_classes must be >= 2, got " +
                                std::to_string(in.num_classes));
  }
  require_real(tag, *in.lo, "lo");
  require_real(tag, *in.hi, "hi");
  try {
    mx::broadcast_shapes(mx::broadcast_shapes(in.lo->shape(), in.hi->shape()), x.shape());
  } catch (const std::invalid_argument&) {
    throw std::invalid_argument(std::string("[") + tag + "] the bounds lo " + shape_string(*in.lo) + " and hi " +
                                shape_string(*in.hi) + " must broadcast to x " + shape_string(x));
  }
  if (in.eps) {
    require_vector(tag, *in.eps, n, "eps");
    require_real(tag, *in.eps, "eps");
  }
  if (in.step_size) {
    require_vector(tag, *in.step_size, n, "step_size");
    require_real(tag, *in.step_size, "step_size");
  }
  if (in.target) {
    require_vector(tag, *in.target, n, "target");
    require_integer(tag, *in.target, "target");
  }
  if (in.probs) {
    const auto& p = *in.probs;
    if (p.ndim() != 2 || p.shape(0) != n || p.shape(1) != in.num_classes) {
      throw std::invalid_argument(std::string("[") + tag + "] probs must have shape (" + std::to_string(n) + ", " +
                                  std::to_string(in.num_classes) + "), got " + shape_string(p));
    }
    require_real(tag, p, "probs");
  }

  // Values: one small graph, evaluated by verify() (or with the caller's result).
  std::vector<std::string> what;
  std::vector<mx::array> ranges{mx::array(static_cast<int64_t>(in.num_classes), mx::int64)};
  auto add_range = [&](const mx::array& labels, const std::string& name) {
    auto l = mx::astype(labels, mx::int64);
    ranges.push_back(mx::min(l));
    ranges.push_back(mx::max(l));
    what.push_back(name);
  };
  add_range(y, in.y_name);
  if (in.target) {
    add_range(*in.target, "target");
  }
  std::vector<mx::array> facts;
  auto add = [&](const std::vector<mx::array>& f, const std::string& message) {
    facts.insert(facts.end(), f.begin(), f.end());
    what.push_back(message);
  };
  auto finite = [](const mx::array& a) { return mx::isfinite(mx::astype(a, mx::float32)); };
  auto lo = mx::astype(*in.lo, mx::float32);
  auto hi = mx::astype(*in.hi, mx::float32);
  add(bad_facts(lo, mx::logical_not(finite(lo))), "lo must be finite");
  add(bad_facts(hi, mx::logical_not(finite(hi))), "hi must be finite");
  auto both = mx::broadcast_arrays({lo, hi});
  add(bad_facts(mx::subtract(both[0], both[1]), mx::greater(both[0], both[1])),
      "the bounds must satisfy lo <= hi (values shown: lo - hi)");
  auto non_negative = [&](const mx::array& a, const char* name) {
    auto v = mx::astype(a, mx::float32);
    auto bad = mx::logical_not(mx::logical_and(mx::isfinite(v), mx::greater_equal(v, mx::array(0.0f))));
    add(bad_facts(v, bad), std::string(name) + " must be finite and >= 0");
  };
  if (in.eps) {
    non_negative(*in.eps, "eps");
  }
  if (in.step_size) {
    non_negative(*in.step_size, "step_size");
  }
  if (in.probs) {
    auto p = mx::astype(*in.probs, mx::float32);
    auto bad = mx::logical_not(mx::logical_and(mx::isfinite(p), mx::greater_equal(p, mx::array(0.0f))));
    add(bad_facts(p, bad), "probs must be finite and >= 0");
    auto sums = mx::sum(p, -1);
    auto off = mx::greater(mx::abs(mx::subtract(sums, mx::array(1.0f))), mx::array(1e-3f));
    add(bad_facts(sums, off), "each row of probs must sum to 1 (values shown: row sums)");
  }
  return PendingInputChecks(tag, what, mx::stack(facts), mx::stack(ranges));
}

void check_loss_inputs(const char* tag, const mx::array& logits, const mx::array& y,
                       const std::optional<mx::array>& target, int min_classes) {
  if (logits.ndim() != 2 || !mx::issubdtype(logits.dtype(), mx::floating)) {
    throw std::invalid_argument(std::string("[") + tag + "] logits must be floating point of shape (N, C), got " +
                                shape_string(logits));
  }
  if (logits.shape(1) < min_classes) {
    throw std::invalid_argument(std::string("[") + tag + "] logits need C >= " + std::to_string(min_classes) +
                                " classes, got C = " + std::to_string(logits.shape(1)));
  }
  const int n = logits.shape(0);
  require_vector(tag, y, n, "y", "logits");
  check_labels(y, logits.shape(1), tag, "y");
  if (target) {
    require_vector(tag, *target, n, "target", "logits");
    check_labels(*target, logits.shape(1), tag, "target");
  }
}

mx::array checked_logits(
    const ForwardFn& forward,
    const std::vector<mx::array>& params,
    const mx::array& x,
    int num_classes,
    const char* where) {
  auto logits = forward(params, x);
  if (logits.ndim() != 2 || logits.shape(0) != x.shape(0) || logits.shape(1) != num_classes) {
    throw std::invalid_argument(
        std::string("[") + where + "] model output must have shape (" + std::to_string(x.shape(0)) +
        ", " + std::to_string(num_classes) + ") for a batch of " + std::to_string(x.shape(0)) +
        ", got " + shape_string(logits));
  }
  if (!mx::issubdtype(logits.dtype(), mx::floating)) {
    throw std::invalid_argument(std::string("[") + where + "] model output must be floating point logits");
  }
  return mx::astype(logits, mx::float32);
}

mx::array row_keys(const mx::array& draw_key, const mx::array& rows) {
  // Mix the index into the key's second word, then hash each row's key through the PRNG (one
  // threefry block per row, batched by vmap: mx::random::bits takes a single key).
  auto k = mx::astype(draw_key, mx::uint32);
  auto r = mx::astype(rows, mx::uint32);
  auto mixed = mx::stack(
      {mx::broadcast_to(mx::take(k, 0, 0), r.shape()), mx::bitwise_xor(mx::take(k, 1, 0), r)}, -1);
  auto hash = mx::vmap([](const mx::array& key) { return mx::random::bits({2}, 4, key); });
  return hash(mixed);
}

mx::array sample_rows(const std::optional<mx::array>& rows, int n, const char* where) {
  if (!rows) {
    return mx::arange(n, mx::uint32);
  }
  if (rows->ndim() != 1 || rows->shape(0) != n || !mx::issubdtype(rows->dtype(), mx::integer)) {
    throw std::invalid_argument(std::string("[") + where + "] rows must be integer sample indices of shape (" +
                                std::to_string(n) + ",), got " + shape_string(*rows));
  }
  return mx::astype(*rows, mx::uint32);
}

Scored score(
    const ForwardFn& forward,
    const std::vector<mx::array>& params,
    const mx::array& x,
    int num_classes,
    bool stochastic,
    int eot_samples,
    const mx::array& draw_key,
    const mx::array& rows,
    const ObjectiveFn& objective,
    const char* where) {
  auto objective_of = [&](const mx::array& z) {
    return objective ? objective(z) : mx::zeros({z.shape(0)}, mx::float32);
  };
  if (!stochastic) {
    auto z = checked_logits(forward, params, x, num_classes, where);
    return {objective_of(z), z};
  }
  auto draws = mx::random::split(draw_key, std::max(eot_samples, 2));
  std::optional<mx::array> total, logits;
  for (int e = 0; e < eot_samples; ++e) {
    std::vector<mx::array> p(params);
    p.push_back(row_keys(mx::take(draws, e, 0), rows));  // the trailing parameter of a stochastic forward
    auto z = checked_logits(forward, p, x, num_classes, where);
    auto l = objective_of(z);
    total = total ? mx::add(*total, l) : l;
    logits = logits ? mx::add(*logits, z) : z;
  }
  auto inv = mx::array(1.0f / eot_samples);
  return {mx::multiply(*total, inv), mx::multiply(*logits, inv)};
}
LossKind parse_loss(const std::string& loss) {
  if (loss == "ce" || loss == "cross_entropy") {
    return LossKind::CrossEntropy;
  }
  if (loss == "margin" || loss == "cw") {
    return LossKind::Margin;
  }
  if (loss == "kl") {
    return LossKind::KL;
  }
  throw std::invalid_argument("[attack] loss must be 'ce', 'margin' or 'kl', got '" + loss + "'");
}

mx::array attack_objective(
    const mx::array& logits,
    const mx::array& y,
    LossKind loss,
    bool targeted,
    const std::optional<mx::array>& probs,
    const std::optional<mx::array>& is_y_in) {
  auto z = mx::astype(logits, mx::float32);
  if (loss == LossKind::KL) {
    if (!probs || probs->ndim() != 2 || probs->shape(0) != z.shape(0) || probs->shape(1) != z.shape(1)) {
      throw std::invalid_argument("[attack] the 'kl' objective needs probs of shape (N, num_classes)");
    }
    auto p = mx::astype(*probs, mx::float32);
    auto log_q = mx::subtract(z, mx::logsumexp(z, -1, true));
    auto plogp = mx::where(mx::greater(p, mx::array(0.0f)), mx::multiply(p, mx::log(p)), mx::array(0.0f));
    auto kl = mx::sum(mx::subtract(plogp, mx::multiply(p, log_q)), -1);
    return targeted ? mx::negative(kl) : kl;
  }
  // z_y as a masked sum rather than a gather: its gradient is elementwise (fused by compile)
  // instead of a scatter into zeros, two kernels fewer per step on the GPU; the value is exact.
  auto is_y = is_y_in ? *is_y_in : class_mask(y, z.shape(-1));
  auto zy = mx::sum(mx::where(is_y, z, mx::array(0.0f)), -1);
  if (loss == LossKind::CrossEntropy) {
    auto ce = mx::subtract(mx::logsumexp(z, -1), zy);
    return targeted ? mx::negative(ce) : ce;
  }
  auto other = mx::max(mx::where(is_y, mx::array(-std::numeric_limits<float>::infinity()), z), -1);
  return targeted ? mx::subtract(zy, other) : mx::subtract(other, zy);
}

mx::array class_mask(const mx::array& y, int num_classes) {
  auto yi = mx::expand_dims(mx::astype(y, mx::int32), -1);
  return mx::equal(mx::expand_dims(mx::arange(num_classes, mx::int32), 0), yi);
}

mx::array attack_success(const mx::array& logits, const mx::array& y, bool targeted) {
  auto pred = mx::argmax(logits, -1);
  auto yi = mx::astype(y, pred.dtype());
  return targeted ? mx::equal(pred, yi) : mx::not_equal(pred, yi);
}
} // namespace mlx_robust
