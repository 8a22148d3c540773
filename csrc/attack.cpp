#include "attack.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <optional>
#include <stdexcept>

#include "mlx/compile_impl.h"

namespace mlx_robust {

std::mutex& core_mutex() {
  static std::mutex m;
  return m;
}

namespace {
// Core entry points this thread is inside (0 or 1: a second entry throws).
thread_local int core_depth = 0;
std::atomic<void (*)()> interrupt_hook{nullptr};
} // namespace

bool in_core() {
  return core_depth > 0;
}

CoreLock::CoreLock() {
  if (core_depth > 0) {
    // This thread holds core_mutex(): waiting for it would wait forever.
    throw std::runtime_error(
        "[mlx-robust] re-entrant call: the model's forward called into mlx-robust "
        "(validate/predict/attack/certify) while it was being traced; call it outside the model");
  }
  lock_ = std::unique_lock<std::mutex>(core_mutex());
  ++core_depth;
}

CoreLock::~CoreLock() {
  --core_depth;
}

void set_interrupt_hook(void (*hook)()) {
  interrupt_hook.store(hook);
}

void check_interrupt() {
  if (auto hook = interrupt_hook.load()) {
    hook();
  }
}

namespace {

// Threefry-2x32 with 20 rounds, as MLX's RandomBits (mlx/backend/cpu/threefry.cpp).
std::pair<uint32_t, uint32_t> threefry2x32(std::pair<uint32_t, uint32_t> key, std::pair<uint32_t, uint32_t> count) {
  static constexpr uint32_t rotations[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
  const uint32_t ks[3] = {key.first, key.second, key.first ^ key.second ^ 0x1BD11BDAu};
  count.first += ks[0];
  count.second += ks[1];
  for (int i = 0; i < 5; ++i) {
    for (auto r : rotations[i % 2]) {
      count.first += count.second;
      count.second = (count.second << r) | (count.second >> (32 - r));
      count.second ^= count.first;
    }
    count.first += ks[(i + 1) % 3];
    count.second += ks[(i + 2) % 3] + i + 1;
  }
  return count;
}

} // namespace

HostKey host_key(const mx::array& key, const char* tag) {
  if (key.ndim() != 1 || key.shape(0) != 2 || key.dtype() != mx::uint32) {
    throw std::invalid_argument(std::string("[") + tag + "] key must be a PRNG key of shape (2,) and dtype uint32, got " +
                                shape_string(key));
  }
  auto k = mx::contiguous(key);
  mx::eval(k);
  auto p = k.data<uint32_t>();
  return {p[0], p[1]};
}

HostKey split_key(HostKey key, int64_t num, int64_t row) {
  if (num < 1 || num > (int64_t{1} << 31) || row < 0 || row >= num) {
    throw std::invalid_argument("[attack] split_key needs 0 <= row < num <= 2**31, got row " + std::to_string(row) +
                                " of " + std::to_string(num));
  }
  // split(key, num) is bits({num, 2}) of one key: 2 num words, word c and word c + num being the
  // two halves of threefry(key, (c, c + num)) for c < num.
  const uint32_t half = static_cast<uint32_t>(num);
  auto word = [&](int64_t p) {
    if (p < num) {
      return threefry2x32(key, {static_cast<uint32_t>(p), static_cast<uint32_t>(p) + half}).first;
    }
    auto c = static_cast<uint32_t>(p - num);
    return threefry2x32(key, {c, c + half}).second;
  };
  return {word(2 * row), word(2 * row + 1)};
}

mx::array split_rows(HostKey key, int64_t num, int64_t begin, int64_t end) {
  if (end < begin) {
    throw std::invalid_argument("[attack] split_rows needs begin <= end");
  }
  std::vector<uint32_t> out;
  out.reserve(static_cast<size_t>(end - begin) * 2);
  for (int64_t r = begin; r < end; ++r) {
    auto k = split_key(key, num, r);
    out.push_back(k.first);
    out.push_back(k.second);
  }
  return mx::array(out.begin(), {static_cast<int>(end - begin), 2}, mx::uint32);
}

mx::array key_array(HostKey key) {
  uint32_t w[2] = {key.first, key.second};
  return mx::array(w, {2}, mx::uint32);
}

namespace {

// MLX_ROBUST_PROFILE=1: print the wall time of each phase of AttackEngine::run to stderr (where a
// call's fixed cost goes; benchmarks/gpu/profile_attack.py --phases).
class PhaseTimer {
 public:
  PhaseTimer() : on_(enabled()), last_(std::chrono::steady_clock::now()) {}
  void mark(const char* phase) {
    if (!on_) {
      return;
    }
    auto now = std::chrono::steady_clock::now();
    std::fprintf(stderr, "[mlx-robust] %-8s %9.1f us\n", phase,
                 std::chrono::duration<double, std::micro>(now - last_).count());
    last_ = now;
  }

 private:
  static bool enabled() {
    const char* v = std::getenv("MLX_ROBUST_PROFILE");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }
  bool on_;
  std::chrono::steady_clock::time_point last_;
};

std::mutex released_mutex;
std::vector<std::uintptr_t> released_ids;
} // namespace

int UnrollCache::get(const mx::Shape& shape) const {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = by_shape_.find(std::vector<int>(shape.begin(), shape.end()));
  return it == by_shape_.end() ? 0 : it->second;
}

int UnrollCache::choose(const mx::Shape& shape, double step_ms) {
  int k = step_ms < 2.0 ? 10 : (step_ms < 6.0 ? 4 : 1);
  std::lock_guard<std::mutex> lock(mutex_);
  by_shape_[std::vector<int>(shape.begin(), shape.end())] = k;
  return k;
}

int UnrollCache::measure(const mx::Shape& shape, int steps, int& done, const std::function<void()>& run_step) {
  run_step();
  done = 1;
  if (done >= steps) {
    return 1;
  }
  auto t0 = std::chrono::steady_clock::now();
  run_step();
  done = 2;
  return choose(shape, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
}

void UnrollCache::clear() {
  std::lock_guard<std::mutex> lock(mutex_);
  by_shape_.clear();
}

void erase_compiled(const std::vector<std::uintptr_t>& ids) {
  auto cache = mx::detail::compile_cache();
  for (auto id : ids) {
    mx::detail::compile_erase(cache, id);
  }
}

void release_compiled(const std::vector<std::uintptr_t>& ids) {
  // Inside the core this thread holds the lock already (try_lock would be undefined): defer.
  if (!in_core()) {
    std::unique_lock<std::mutex> serial(core_mutex(), std::try_to_lock);
    if (serial.owns_lock()) {
      erase_compiled(ids);
      return;
    }
  }
  std::lock_guard<std::mutex> lock(released_mutex);
  released_ids.insert(released_ids.end(), ids.begin(), ids.end());
}

void drain_released() {
  std::vector<std::uintptr_t> ids;
  {
    std::lock_guard<std::mutex> lock(released_mutex);
    ids.swap(released_ids);
  }
  erase_compiled(ids);
}

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

std::string num_string(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

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

std::string shape_string(const mx::array& a) {
  std::string out = "(";
  for (int i = 0; i < static_cast<int>(a.ndim()); ++i) {
    out += (i ? ", " : "") + std::to_string(a.shape(i));
  }
  return out + (a.ndim() == 1 ? ",)" : ")");
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

int next_pow2(int n) {
  int p = 1;
  while (p < n) {
    p <<= 1;
  }
  return p;
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

namespace {

// Compiled-function input layout.
// STEP_KEYS (k, 2): the keys of the chunk's k steps of a stochastic model (rows t0 .. t0 + k - 1 of the
// restart's split(noise key, steps + 1)), indexed from the chunk's start; T0: index of the chunk's
// first step.
// PROBS (N, C): clean probabilities for the KL objective, a dummy otherwise.
// ROWS (N,): each row's global sample index (keys a stochastic model's per-row draws).
enum Slot : int { X = 0, BX, BL, BS, BZ, X0, Y, EPS, ALPHA, LO, HI, STEP_KEYS, PROBS, ROWS, T0, NUM_SLOTS };

struct Best {
  mx::array x, loss, success, logits;
};

// Keep the first success; among failures keep the highest objective. NaN never replaces.
Best keep_best(const Best& old, const Best& cand, int ndim) {
  auto take_new = mx::logical_and(
      mx::logical_not(old.success),
      mx::logical_or(cand.success, mx::greater(cand.loss, old.loss)));
  auto col = mx::expand_dims(take_new, -1);
  return {
      mx::where(per_sample(take_new, ndim), cand.x, old.x),
      mx::where(take_new, cand.loss, old.loss),
      mx::logical_or(old.success, cand.success),
      mx::where(col, cand.logits, old.logits)};
}

// Per step within a restart: a sample's first successful iterate is kept (x and logits); the
// objective's value of the kept iterate is derived once, at the end of the restart.
Best first_success(const Best& best, const mx::array& x, const mx::array& success, const mx::array& logits, int ndim) {
  // `success` feeds only the new flag, so its comparison fuses with the or: one kernel fewer a step.
  auto now = mx::logical_or(best.success, success);
  auto take = mx::logical_and(now, mx::logical_not(best.success));
  return {mx::where(per_sample(take, ndim), x, best.x), best.loss, now,
          mx::where(mx::expand_dims(take, -1), logits, best.logits)};
}

// The objective at the kept logits (the mean logits of a random model's draws).
mx::array kept_objective(const Best& best, const mx::array& y, const AttackConfig& cfg, const mx::array& probs) {
  std::optional<mx::array> p;
  if (cfg.loss == LossKind::KL) {
    p = probs;
  }
  return attack_objective(best.logits, y, cfg.loss, cfg.targeted, p);
}

// End of a restart: samples that succeeded at some step keep their first successful iterate, with
// the objective at its logits; the others take the last iterate (scored in `last`).
Best finish_restart(const Best& best, const Best& last, const mx::array& y, const AttackConfig& cfg,
                    const mx::array& probs, int ndim) {
  const auto& done = best.success;
  return {mx::where(per_sample(done, ndim), best.x, last.x),
          mx::where(done, kept_objective(best, y, cfg, probs), last.loss),
          mx::logical_or(done, last.success),
          mx::where(mx::expand_dims(done, -1), best.logits, last.logits)};
}

struct Evaluated {
  mx::array loss, success, logits;
};


// Objective, success and logits at x. A stochastic model is run eot_samples times with keys drawn
// from step t's key (EOT, Athalye et al. 2018): objective and logits are the means over the draws,
// success is judged on the mean logits.
Evaluated check_and_score(
    const ForwardFn& forward,
    const std::vector<mx::array>& params,
    const mx::array& x,
    const mx::array& y,
    int num_classes,
    const AttackConfig& cfg,
    const mx::array& step_keys,
    const mx::array& t,
    const mx::array& probs_in,
    const mx::array& rows,
    const std::optional<mx::array>& is_y = std::nullopt) {
  std::optional<mx::array> probs;
  if (cfg.loss == LossKind::KL) {
    probs = probs_in;
  }
  auto objective = [&](const mx::array& z) { return attack_objective(z, y, cfg.loss, cfg.targeted, probs, is_y); };
  auto draw_key = cfg.stochastic ? mx::take(step_keys, t, 0) : step_keys;
  auto sc = score(forward, params, x, num_classes, cfg.stochastic, cfg.eot_samples, draw_key, rows, objective, "attack");
  return {sc.objective, attack_success(sc.logits, y, cfg.targeted), sc.logits};
}

// Deterministic models with best-iterate tracking, every step run: a sample's x stops at its first
// success, so no best x or logits travel per step (two selects a step fewer). A random model's
// success is judged on one draw and must be kept with that draw's logits; with early stop, rows
// leave mid-restart and take their kept logits with them (scoring them there would cost a forward
// of the working batch per shrink: 15% of the MLP's early-stop time on the CPU).
bool freezes(const AttackConfig& cfg) {
  return cfg.track_best && !cfg.stochastic && !cfg.early_stop;
}

std::vector<mx::array> slice_params(const std::vector<mx::array>& in) {
  return std::vector<mx::array>(in.begin() + NUM_SLOTS, in.end());
}

// k ascent steps; the best-so-far state travels through the compiled function.
std::vector<mx::array> steps_fn(
    const ForwardFn& forward,
    const std::vector<mx::array>& in,
    int k,
    int num_classes,
    const AttackConfig& cfg) {
  auto params = slice_params(in);
  const auto& y = in[Y];
  auto x = in[X];
  int nd = x.ndim();
  Best best{in[BX], in[BL], in[BS], in[BZ]};
  // Built once per call: compile does not merge the steps' copies of an input-free arange.
  auto is_y = class_mask(y, num_classes);
  for (int j = 0; j < k; ++j) {
    // Loss, success and logits ride along as values of the one forward pass (as mx.value_and_grad
    // does with aux outputs); only the summed objective is differentiated.
    std::optional<Evaluated> ev;
    auto t = mx::array(j, mx::int32);  // the step's row of the chunk's keys
    auto objective = [&](const std::vector<mx::array>& xs) -> std::vector<mx::array> {
      ev = check_and_score(forward, params, xs[0], y, num_classes, cfg, in[STEP_KEYS], t, in[PROBS], in[ROWS], is_y);
      return {mx::sum(ev->loss)};
    };
    auto grads = mx::vjp(objective, {x}, {mx::array(1.0f)}).second;
    auto next = project(ascent_step(x, grads[0], in[ALPHA], cfg.norm), in[X0], in[EPS], in[LO], in[HI], cfg.norm);
    if (freezes(cfg)) {
      // A deterministic model's sample stops moving at its first success: x itself is the kept
      // iterate (the select fuses into the step's kernel), and final_fn scores it once.
      best.success = mx::logical_or(best.success, ev->success);
      x = mx::where(per_sample(best.success, nd), x, next);
      best.x = x;
      continue;
    }
    if (cfg.track_best) {
      // Within a restart: each sample's first successful iterate. The objective's value is not
      // carried per step (final_fn derives it from the kept logits): on the GPU, carrying it cost
      // a reduction and a comparison per step, about a third of a small model's step.
      best = first_success(best, x, ev->success, ev->logits, nd);
    } else {
      best = {x, ev->loss, ev->success, ev->logits};
    }
    x = next;
  }
  return {x, best.x, best.loss, best.success, best.logits};
}

// Score the last iterate and fold it into the best-so-far state.
std::vector<mx::array> final_fn(
    const ForwardFn& forward,
    const std::vector<mx::array>& in,
    int num_classes,
    const AttackConfig& cfg) {
  auto params = slice_params(in);
  auto ev = check_and_score(forward, params, in[X], in[Y], num_classes, cfg, in[STEP_KEYS], mx::array(0, mx::int32),
                            in[PROBS], in[ROWS]);
  Best best{in[X], ev.loss, ev.success, ev.logits};
  if (cfg.track_best && !freezes(cfg)) {
    best = finish_restart({in[BX], in[BL], in[BS], in[BZ]}, best, in[Y], cfg, in[PROBS], in[X].ndim());
  }
  return {in[X], best.x, best.loss, best.success, best.logits};
}

mx::array take_rows(const mx::array& a, const mx::array& idx) {
  return mx::take(a, idx, 0);
}

} // namespace

AttackOutput AttackEngine::run(
    const ForwardFn& forward,
    const std::vector<mx::array>& params,
    const mx::array& x0_in,
    const mx::array& y_in,
    const mx::array& eps_in,
    const mx::array& step_size_in,
    const mx::array& lo,
    const mx::array& hi,
    int num_classes,
    const AttackConfig& cfg,
    const mx::array& key,
    const std::optional<mx::array>& probs_in,
    const std::optional<mx::array>& rows_in) {
  PhaseTimer timer;
  // Argument checks: the Python layer checks first, but this layer never trusts its caller.
  if (x0_in.ndim() < 2 || x0_in.shape(0) < 1) {
    throw std::invalid_argument("[attack] x must be a non-empty batch of rank >= 2");
  }
  if (!mx::issubdtype(x0_in.dtype(), mx::floating)) {
    throw std::invalid_argument("[attack] x must be floating point");
  }
  const int n = x0_in.shape(0);
  if (y_in.ndim() != 1 || y_in.shape(0) != n) {
    throw std::invalid_argument("[attack] y must have shape (N,) matching x");
  }
  if (eps_in.ndim() != 1 || eps_in.shape(0) != n || step_size_in.ndim() != 1 ||
      step_size_in.shape(0) != n) {
    throw std::invalid_argument("[attack] eps and step_size must have shape (N,)");
  }
  if (num_classes < 1) {
    throw std::invalid_argument("[attack] num_classes must be >= 1");
  }
  if (!mx::issubdtype(y_in.dtype(), mx::integer)) {
    throw std::invalid_argument("[attack] y must hold integer class labels");
  }
  if (cfg.steps < 1 || cfg.restarts < 1) {
    throw std::invalid_argument("[attack] steps and restarts must be >= 1");
  }
  if (cfg.early_stop && !cfg.track_best) {
    throw std::invalid_argument("[attack] early_stop needs track_best (it would change the result)");
  }
  if (cfg.loss == LossKind::KL &&
      (!probs_in || probs_in->ndim() != 2 || probs_in->shape(0) != n || probs_in->shape(1) != num_classes)) {
    throw std::invalid_argument("[attack] loss 'kl' needs probs of shape (N, num_classes)");
  }
  if (cfg.eot_samples < 1) {
    throw std::invalid_argument("[attack] eot_samples must be >= 1");
  }
  if (cfg.unroll < 0) {
    throw std::invalid_argument("[attack] unroll must be >= 0");
  }
  auto sample_idx = sample_rows(rows_in, n, "attack");
  AttackInputs inputs(x0_in, y_in, num_classes, lo, hi, &eps_in);
  inputs.step_size = &step_size_in;
  if (cfg.loss == LossKind::KL) {
    inputs.probs = &*probs_in;
  }
  auto checks = check_attack_inputs("attack", inputs);

  CoreLock serial;
  drain_released();  // before this engine's address can be reused by a new engine's ids
  auto x0 = mx::astype(x0_in, mx::float32);
  // The values (labels, bounds, eps, probs) are checked without a host round trip: the checks are
  // evaluated with the result (and raise then), while the loop only ever sees labels clipped into
  // range (no gather or compare can go out of bounds, whatever the caller passed).
  auto y_raw = mx::astype(y_in, mx::int64);
  auto y = mx::astype(mx::clip(y_raw, mx::array(0, mx::int64), mx::array(num_classes - 1, mx::int64)), mx::int32);
  auto eps = mx::astype(eps_in, mx::float32);
  auto alpha = mx::astype(step_size_in, mx::float32);
  auto probs = cfg.loss == LossKind::KL ? mx::astype(*probs_in, mx::float32) : mx::zeros({1, 1}, mx::float32);
  auto lo32 = mx::astype(lo, mx::float32);
  auto hi32 = mx::astype(hi, mx::float32);
  const int nd = x0.ndim();

  // Configuration is part of the compile cache key; the model is tied to this engine's ids.
  auto constants = [&](int k, int kind) {
    return std::vector<uint64_t>{
        static_cast<uint64_t>(kind), static_cast<uint64_t>(k),
        static_cast<uint64_t>(cfg.norm), static_cast<uint64_t>(cfg.loss),
        static_cast<uint64_t>(cfg.targeted), static_cast<uint64_t>(cfg.track_best),
        static_cast<uint64_t>(num_classes), static_cast<uint64_t>(cfg.stochastic),
        static_cast<uint64_t>(cfg.eot_samples), static_cast<uint64_t>(fast_pool_enabled()),
        static_cast<uint64_t>(freezes(cfg))};
  };
  auto make_steps = [&](int k) {
    auto fn = [this, &forward, k, num_classes, &cfg](const std::vector<mx::array>& in) {
      traces_++;
      return steps_fn(forward, in, k, num_classes, cfg);
    };
    return mx::detail::compile(fn, step_id(), false, constants(k, 0));
  };
  auto finish = mx::detail::compile(
      [this, &forward, num_classes, &cfg](const std::vector<mx::array>& in) {
        traces_++;
        return final_fn(forward, in, num_classes, cfg);
      },
      eval_id(), false, constants(0, 1));

  // Full-batch best state, merged into after every restart (and on every shrink).
  Best full{x0, mx::full({n}, -std::numeric_limits<float>::infinity()), mx::zeros({n}, mx::bool_),
            mx::zeros({n, num_classes}, mx::float32)};
  // Random starts use split(key, restarts); a stochastic model's draws use keys split from the
  // other half of split(key), one per step of each restart, so neither depends on the unroll depth.
  // Derived on the host (split_key, bit-identical to mx::random::split), so that no array grows
  // with `restarts` or `steps`: a chunk receives only its own steps' keys.
  const HostKey user_key = host_key(key, "attack");
  const HostKey noise_key = split_key(user_key, 2, 1);

  int unroll = cfg.unroll;
  if (unroll == 0) {
    unroll = chosen_unroll(x0.shape());
  }
  bool measure = unroll == 0;  // first call for this shape: time one step, then choose

  timer.mark("setup");
  bool merged = false;  // has `full` received a working batch yet?
  try {
    for (int r = 0; r < cfg.restarts; ++r) {
      // Active set: every sample, or those not yet successful.
      std::vector<int> active;
      if (cfg.early_stop && r > 0) {
        mx::eval(full.success);
        auto s = full.success.data<bool>();
        for (int i = 0; i < n; ++i) {
          if (!s[i]) {
            active.push_back(i);
          }
        }
        if (active.empty()) {
          break;
        }
      } else {
        for (int i = 0; i < n; ++i) {
          active.push_back(i);
        }
      }

      auto start_all = cfg.random_start
          ? random_start(x0, eps, lo32, hi32, cfg.norm, key_array(split_key(user_key, cfg.restarts, r)))
          : x0;

      // Keys of steps [t, t + k) of split(noise key of restart r, steps + 1) (row `steps` scores the
      // last iterate); a dummy for a deterministic model.
      const HostKey restart_noise = cfg.stochastic ? split_key(noise_key, cfg.restarts, r) : HostKey{0, 0};
      const auto no_keys = mx::zeros({1, 2}, mx::uint32);
      auto keys_of = [&](int64_t t, int64_t k) {
        return cfg.stochastic ? split_rows(restart_noise, static_cast<int64_t>(cfg.steps) + 1, t, t + k) : no_keys;
      };
      auto step_keys = keys_of(0, 1);

      // Working batch: the active samples, padded with copies to a power of two so that a
      // shrinking batch retraces at most log2(N) times.
      std::vector<int> rows;
      bool identity = false;
      std::vector<mx::array> state;  // x, bx, bl, bs, bz
      std::vector<mx::array> fixed;  // x0, y, eps, alpha, lo, hi
      auto gather = [&](const std::vector<mx::array>& from_state, bool fresh) {
        int size = active.size() == static_cast<size_t>(n) ? n : std::min(n, next_pow2(active.size()));
        std::vector<int> new_rows(active);
        while (static_cast<int>(new_rows.size()) < size) {
          new_rows.push_back(active[0]);
        }
        auto new_idx = mx::array(new_rows.data(), {size}, mx::int32);
        identity = size == n && static_cast<int>(active.size()) == n;
        for (int p = 0; identity && p < n; ++p) {
          identity = new_rows[p] == p;
        }
        // The common case (no early stop yet): use the full arrays as they are, no gathers.
        auto rows_of = [&](const mx::array& a) { return identity ? a : take_rows(a, new_idx); };
        if (fresh) {
          // A new restart competes from scratch; the merge below keeps the earlier best.
          auto start = rows_of(start_all);
          state = {start, start, mx::full({size}, -std::numeric_limits<float>::infinity()),
                   mx::zeros({size}, mx::bool_), mx::zeros({size, num_classes}, mx::float32)};
        } else {
          // Map new rows to their position in the old working batch.
          std::vector<int> pos_of(n, -1);
          for (int p = static_cast<int>(rows.size()) - 1; p >= 0; --p) {
            pos_of[rows[p]] = p;
          }
          std::vector<int> sel;
          for (int i : new_rows) {
            sel.push_back(pos_of[i]);
          }
          auto sel_idx = mx::array(sel.data(), {size}, mx::int32);
          std::vector<mx::array> s;
          for (auto& a : from_state) {
            s.push_back(take_rows(a, sel_idx));
          }
          state = s;
        }
        fixed = {rows_of(x0), rows_of(y), rows_of(eps), rows_of(alpha), lo32, hi32, step_keys,
                 cfg.loss == LossKind::KL ? rows_of(probs) : probs, rows_of(sample_idx)};
        rows = new_rows;
      };
      gather({}, true);

      int done = 0;
      auto inputs_of = [&](const std::vector<mx::array>& st) {
        std::vector<mx::array> in(st);
        in.insert(in.end(), fixed.begin(), fixed.end());
        in.push_back(mx::array(done, mx::int32));
        in.insert(in.end(), params.begin(), params.end());
        return in;
      };
      auto run_chunk = [&](int k) {
        check_interrupt();
        fixed[STEP_KEYS - X0] = keys_of(done, k);
        state = make_steps(k)(inputs_of(state));
        mx::async_eval(state);
      };

      // Merge the working batch's best into the full arrays (first occurrence of each row).
      auto flush = [&](bool restart_done) {
        Best cand{state[1], state[2], state[3], state[4]};
        if (cfg.track_best && !restart_done) {
          // Mid-restart (rows leaving on early stop): the objective of the kept iterates, and
          // no claim for rows not yet successful.
          cand.loss = mx::where(cand.success, kept_objective(cand, fixed[1], cfg, fixed[7]),
                                mx::array(-std::numeric_limits<float>::infinity()));
        }
        if (!identity) {
          std::vector<int> pos(n, 0);
          std::vector<uint8_t> present(n, 0);
          for (int p = static_cast<int>(active.size()) - 1; p >= 0; --p) {
            pos[active[p]] = p;
            present[active[p]] = 1;
          }
          auto pos_idx = mx::array(pos.data(), {n}, mx::int32);
          auto mask = mx::astype(mx::array(present.begin(), {n}, mx::uint8), mx::bool_);
          // Rows absent from the working batch compete with -inf and no success: never win.
          cand = {take_rows(cand.x, pos_idx),
                  mx::where(mask, take_rows(cand.loss, pos_idx),
                            mx::array(-std::numeric_limits<float>::infinity())),
                  mx::logical_and(take_rows(cand.success, pos_idx), mask),
                  take_rows(cand.logits, pos_idx)};
        }
        // The first restart has nothing to compete with.
        full = (cfg.track_best && merged) ? keep_best(full, cand, nd) : cand;
        merged = true;
      };

      if (measure) {
        // Unroll deep only where steps are cheap (host-bound): unrolling slows compute-bound models.
        unroll = unrolls_.measure(x0.shape(), cfg.steps, done, [&] {
          run_chunk(1);
          mx::eval(state);
        });
        measure = false;
      }

      while (done < cfg.steps) {
        // Full chunks of `unroll` steps, then single steps: only two step graphs per shape, so a
        // later call with another step count never traces again.
        int k = cfg.steps - done >= unroll ? unroll : 1;
        auto prev_success = state[3];
        run_chunk(k);
        done += k;
        if (cfg.early_stop && done < cfg.steps) {
          // Successes known one chunk ago (the new chunk is already queued behind them).
          mx::eval(prev_success);
          auto s = prev_success.data<bool>();
          std::vector<int> still;
          for (size_t p = 0; p < active.size(); ++p) {
            if (!s[p]) {
              still.push_back(active[p]);
            }
          }
          if (still.empty()) {
            break;
          }
          int size = static_cast<int>(rows.size());
          if (static_cast<int>(still.size()) * 2 <= size) {
            flush(false);  // the leaving rows' results live only in the working batch
            mx::eval({full.x, full.loss, full.success, full.logits});
            active = still;
            gather(state, false);
          }
        }
      }
      timer.mark("steps");
      fixed[STEP_KEYS - X0] = keys_of(cfg.steps, 1);
      state = finish(inputs_of(state));
      flush(true);
      timer.mark("finish");
      if (r + 1 < cfg.restarts) {
        // The next restart reads full.success only with early stop (and evaluates it then).
        mx::async_eval({full.x, full.loss, full.success, full.logits});
      }
    }
  } catch (...) {
    // A failed trace can leave a half-built entry behind: drop this engine's compiled functions.
    clear();
    throw;
  }

  // One host round trip for the whole result, the label check included.
  auto norms = batch_norm_of(mx::subtract(full.x, x0), cfg.norm);
  auto x_adv = mx::astype(full.x, x0_in.dtype());
  std::vector<mx::array> outputs{x_adv, norms, full.success, full.loss, full.logits};
  for (auto& a : checks.arrays()) {
    outputs.push_back(a);
  }
  mx::eval(outputs);
  timer.mark("eval");
  checks.verify();
  return {x_adv, full.success, full.loss, full.logits, norms};
}

} // namespace mlx_robust
