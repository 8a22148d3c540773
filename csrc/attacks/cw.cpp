#include "attacks/cw.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "attacks/apgd.h"

namespace mlx_robust {

namespace {

// Double constants so that 1 - beta rounds once, to the float nearest 0.1 (0.001).
constexpr double kBeta1 = 0.9;
constexpr double kBeta2 = 0.999;
constexpr float kAdamEps = 1e-8f;
constexpr float kNoBound = 1e10f;  // "no upper bound on c known yet" (authors' code)

// Compiled-function input layout: the per-sample state, then the fixed inputs.
enum Slot : int {
  W = 0,   // tanh-space variable
  M,       // Adam first moment
  V,       // Adam second moment
  RS,      // a success was found in this round (drives the binary search)
  BL2,     // smallest squared L2 of a success over all rounds
  BX,      // that x' (x while none)
  BZ,      // its logits (the clean logits while none)
  FOUND,
  PREV,    // objective at the last early-abort check
  ACTIVE,  // not aborted in this round
  NUM_STATE,
  X0 = NUM_STATE,
  Y,
  C,
  KAPPA,
  LR,
  LO,
  HI,
  PERIOD,  // early-abort check every PERIOD steps (int32)
  KEYS,    // (k, 2): draw keys of the chunk's k steps of a stochastic model (rows t0 .. t0 + k - 1 of
           // the round's split(round key, steps)), indexed from the chunk's start
  ROWS,    // (N,): global sample indices (key a stochastic model's per-row draws)
  T0,
  NUM_SLOTS
};

mx::array margin_loss(const mx::array& logits, const mx::array& y, const mx::array& kappa, bool targeted) {
  auto z = mx::astype(logits, mx::float32);
  auto yi = mx::expand_dims(mx::astype(y, mx::int32), -1);
  auto zy = mx::squeeze(mx::take_along_axis(z, yi, -1), -1);
  auto classes = mx::expand_dims(mx::arange(z.shape(-1), mx::int32), 0);
  auto other = mx::max(
      mx::where(mx::equal(classes, yi), mx::array(-std::numeric_limits<float>::infinity()), z), -1);
  auto gap = targeted ? mx::subtract(other, zy) : mx::subtract(zy, other);
  return mx::maximum(gap, mx::negative(kappa));
}

// Success with confidence kappa: the prediction after moving the label's logit by kappa against
// the attacker (the authors' `compare`); kappa = 0 gives attack_success.
mx::array kappa_success(const mx::array& logits, const mx::array& y, const mx::array& kappa, bool targeted) {
  auto yi = mx::expand_dims(mx::astype(y, mx::int32), -1);
  auto classes = mx::expand_dims(mx::arange(logits.shape(-1), mx::int32), 0);
  auto shift = mx::where(mx::equal(classes, yi), targeted ? mx::negative(kappa) : kappa, mx::array(0.0f));
  return attack_success(mx::add(mx::astype(logits, mx::float32), shift), y, targeted);
}

mx::array to_input_space(const mx::array& w, const mx::array& lo, const mx::array& hi) {
  auto unit = mx::multiply(mx::add(mx::tanh(w), mx::array(1.0f)), mx::array(0.5f));
  return mx::clip(mx::add(lo, mx::multiply(mx::subtract(hi, lo), unit)), lo, hi);
}

std::vector<mx::array> steps_fn(
    const ForwardFn& forward,
    const std::vector<mx::array>& in,
    int k,
    int num_classes,
    const CwConfig& cfg) {
  std::vector<mx::array> params(in.begin() + NUM_SLOTS, in.end());
  std::vector<mx::array> s(in.begin(), in.begin() + NUM_STATE);
  const auto& x0 = in[X0];
  const int nd = x0.ndim();
  std::vector<int> axes;
  for (int i = 1; i < nd; ++i) {
    axes.push_back(i);
  }
  for (int j = 0; j < k; ++j) {
    auto t = mx::add(in[T0], mx::array(j, mx::int32));
    auto draw_key = cfg.stochastic ? mx::take(in[KEYS], mx::array(j, mx::int32), 0) : mx::zeros({2}, mx::uint32);
    std::optional<mx::array> xa, l2, loss, logits;
    auto objective = [&](const std::vector<mx::array>& ws) -> std::vector<mx::array> {
      xa = to_input_space(ws[0], in[LO], in[HI]);
      auto margin = [&](const mx::array& z) { return margin_loss(z, in[Y], in[KAPPA], cfg.targeted); };
      auto sc = score(forward, params, *xa, num_classes, cfg.stochastic, cfg.eot_samples, draw_key,
                             in[ROWS], margin, "cw");
      l2 = mx::sum(mx::square(mx::subtract(*xa, x0)), axes);
      loss = mx::add(*l2, mx::multiply(in[C], sc.objective));
      logits = sc.logits;
      return {mx::sum(*loss)};
    };
    auto grad = mx::vjp(objective, {s[W]}, {mx::array(1.0f)}).second[0];

    auto success = mx::logical_and(s[ACTIVE], kappa_success(*logits, in[Y], in[KAPPA], cfg.targeted));
    auto better = mx::logical_and(success, mx::less(*l2, s[BL2]));
    s[RS] = mx::logical_or(s[RS], success);
    s[BL2] = mx::where(better, *l2, s[BL2]);
    s[BX] = mx::where(per_sample(better, nd), *xa, s[BX]);
    s[BZ] = mx::where(mx::expand_dims(better, -1), *logits, s[BZ]);
    s[FOUND] = mx::logical_or(s[FOUND], better);

    if (cfg.early_abort) {
      auto check = mx::equal(mx::remainder(t, in[PERIOD]), mx::array(0, mx::int32));
      auto stop = mx::logical_and(check, mx::greater(*loss, mx::multiply(s[PREV], mx::array(0.9999f))));
      s[ACTIVE] = mx::logical_and(s[ACTIVE], mx::logical_not(stop));
      s[PREV] = mx::where(mx::logical_and(check, s[ACTIVE]), *loss, s[PREV]);
    }

    auto step = mx::astype(mx::add(t, mx::array(1, mx::int32)), mx::float32);
    auto f32 = [](double v) { return mx::array(static_cast<float>(v)); };
    auto m = mx::add(mx::multiply(f32(kBeta1), s[M]), mx::multiply(f32(1.0 - kBeta1), grad));
    auto v = mx::add(mx::multiply(f32(kBeta2), s[V]), mx::multiply(f32(1.0 - kBeta2), mx::square(grad)));
    auto bc1 = mx::subtract(mx::array(1.0f), mx::power(f32(kBeta1), step));
    auto bc2 = mx::subtract(mx::array(1.0f), mx::power(f32(kBeta2), step));
    auto update = mx::divide(mx::divide(m, bc1), mx::add(mx::sqrt(mx::divide(v, bc2)), mx::array(kAdamEps)));
    auto w = mx::subtract(s[W], mx::multiply(in[LR], update));
    auto act = per_sample(s[ACTIVE], nd);
    s[W] = mx::where(act, w, s[W]);
    s[M] = mx::where(act, m, s[M]);
    s[V] = mx::where(act, v, s[V]);
  }
  return s;
}

// The tanh change of variables: w with x = lo + (hi - lo) (tanh(w) + 1) / 2; 0.999999 keeps atanh
// finite at the bounds (authors' code).
mx::array to_tanh_space(const mx::array& x0, const mx::array& lo, const mx::array& hi) {
  auto unit = mx::subtract(mx::multiply(mx::divide(mx::subtract(x0, lo), mx::subtract(hi, lo)), mx::array(2.0f)),
                           mx::array(1.0f));
  return mx::arctanh(mx::multiply(mx::clip(unit, mx::array(-1.0f), mx::array(1.0f)), mx::array(0.999999f)));
}

// Binary search on c per sample after a round (the authors' update): success lowers the upper
// bound, failure raises the lower one; without an upper bound yet, c grows tenfold.
void bisect_c(const mx::array& success, mx::array& c, mx::array& lower, mx::array& upper) {
  upper = mx::where(success, mx::minimum(upper, c), upper);
  lower = mx::where(success, lower, mx::maximum(lower, c));
  auto bisect = mx::multiply(mx::add(lower, upper), mx::array(0.5f));
  c = mx::where(mx::less(upper, mx::array(1e9f)), bisect, mx::where(success, c, mx::multiply(c, mx::array(10.0f))));
}

// The settings (the inputs are check_attack_inputs'): std::invalid_argument("[cw] ...").
void check_config(const CwConfig& cfg) {
  auto positive = [](float v) { return std::isfinite(v) && v > 0.0f; };
  if (cfg.steps < 1) {
    throw std::invalid_argument("[cw] steps must be >= 1, got " + std::to_string(cfg.steps));
  }
  if (cfg.binary_search_steps < 1) {
    throw std::invalid_argument("[cw] binary_search_steps must be >= 1, got " +
                                std::to_string(cfg.binary_search_steps));
  }
  if (!positive(cfg.initial_const)) {
    throw std::invalid_argument("[cw] c must be a finite number > 0, got " + std::to_string(cfg.initial_const));
  }
  if (!std::isfinite(cfg.kappa) || cfg.kappa < 0.0f) {
    throw std::invalid_argument("[cw] kappa must be a finite number >= 0, got " + std::to_string(cfg.kappa));
  }
  if (!positive(cfg.lr)) {
    throw std::invalid_argument("[cw] lr must be a finite number > 0, got " + std::to_string(cfg.lr));
  }
  if (cfg.eot_samples < 1) {
    throw std::invalid_argument("[cw] eot_samples must be >= 1, got " + std::to_string(cfg.eot_samples));
  }
  if (cfg.unroll < 0) {
    throw std::invalid_argument("[cw] unroll must be >= 0, got " + std::to_string(cfg.unroll));
  }
}

} // namespace

mx::array cw_margin_loss(const mx::array& logits, const mx::array& y, float kappa, bool targeted) {
  return margin_loss(logits, y, mx::array(kappa), targeted);
}

AttackOutput CwEngine::run(
    const ForwardFn& forward,
    const std::vector<mx::array>& params,
    const mx::array& x0_in,
    const mx::array& y_in,
    const mx::array& lo,
    const mx::array& hi,
    int num_classes,
    const CwConfig& cfg,
    const mx::array& key,
    const std::optional<mx::array>& rows_in) {
  suite::check_batch(x0_in, y_in, num_classes, "cw");
  const int n = x0_in.shape(0);
  auto sample_idx = sample_rows(rows_in, n, "cw");
  check_config(cfg);
  AttackInputs inputs(x0_in, y_in, num_classes, lo, hi);
  auto checks = check_attack_inputs("cw", inputs);

  CoreLock serial;
  drain_released();
  checks.verify();  // before any label reaches a gather
  auto x0 = mx::astype(x0_in, mx::float32);
  auto y = mx::astype(y_in, mx::int32);
  auto lo32 = mx::astype(lo, mx::float32);
  auto hi32 = mx::astype(hi, mx::float32);
  if (!mx::all(mx::less(lo32, hi32)).item<bool>()) {
    throw std::invalid_argument("[cw] the input bounds must satisfy lo < hi");
  }
  const float inf = std::numeric_limits<float>::infinity();

  const std::vector<uint64_t> settings{
      static_cast<uint64_t>(cfg.targeted), static_cast<uint64_t>(cfg.early_abort),
      static_cast<uint64_t>(num_classes), static_cast<uint64_t>(cfg.stochastic),
      static_cast<uint64_t>(cfg.eot_samples)};
  auto clean_fn = compile_step(0, 0, settings, [&forward, num_classes, &cfg](const std::vector<mx::array>& in) {
    std::vector<mx::array> params(in.begin() + 3, in.end());
    return std::vector<mx::array>{
        score(forward, params, in[0], num_classes, cfg.stochastic, cfg.eot_samples, in[1], in[2], nullptr, "cw")
            .logits};
  });
  auto make_steps = [&](int k) {
    return compile_step(1, k, settings, [&forward, k, num_classes, &cfg](const std::vector<mx::array>& in) {
      return steps_fn(forward, in, k, num_classes, cfg);
    });
  };

  auto w0 = to_tanh_space(x0, lo32, hi32);
  // Rows of mx::random::split as always, derived on the host (split_key): nothing per step.
  const HostKey user_key = host_key(key, "cw");
  const HostKey round_stream = split_key(user_key, 2, 0);
  auto kappa = mx::array(cfg.kappa);
  auto lr = mx::array(cfg.lr);
  auto period = mx::array(std::max(cfg.steps / 10, 1), mx::int32);

  ChunkedLoop loop(unrolls_, x0.shape(), cfg.steps, cfg.unroll);

  mx::array bl2(0.0f), bx(0.0f), bz(0.0f), found(false);
  try {
    std::vector<mx::array> clean_in{x0, key_array(split_key(user_key, 2, 1)), sample_idx};
    clean_in.insert(clean_in.end(), params.begin(), params.end());
    auto logits0 = clean_fn(clean_in)[0];
    // A sample already misclassified with margin kappa is its own smallest perturbation.
    found = kappa_success(logits0, y, kappa, cfg.targeted);
    bl2 = mx::where(found, mx::array(0.0f), mx::array(inf));
    bx = x0;
    bz = logits0;

    auto c = mx::full({n}, cfg.initial_const, mx::float32);
    auto lower = mx::zeros({n}, mx::float32);
    auto upper = mx::full({n}, kNoBound, mx::float32);
    for (int r = 0; r < cfg.binary_search_steps; ++r) {
      if (cfg.binary_search_steps >= 10 && r == cfg.binary_search_steps - 1) {
        c = mx::minimum(upper, mx::array(kNoBound));  // the authors' last-round repeat
      }
      const HostKey round_key = cfg.stochastic ? split_key(round_stream, cfg.binary_search_steps, r) : HostKey{0, 0};
      const auto no_keys = mx::zeros({1, 2}, mx::uint32);
      auto keys_of = [&](int64_t t, int64_t k) {
        return cfg.stochastic ? split_rows(round_key, cfg.steps, t, t + k) : no_keys;
      };
      auto keys = keys_of(0, 1);
      std::vector<mx::array> state{w0, mx::zeros_like(w0), mx::zeros_like(w0), mx::zeros({n}, mx::bool_),
                                   bl2, bx, bz, found, mx::full({n}, inf), mx::ones({n}, mx::bool_)};
      std::vector<mx::array> fixed{x0, y, c, kappa, lr, lo32, hi32, period, keys, sample_idx};
      int done = 0;
      auto chunk = [&](int k) {
        fixed[KEYS - X0] = keys_of(done, k);
        return make_steps(k)(chunk_inputs(state, fixed, done, params));
      };
      // Aborted samples are frozen, so stopping the round once all are is only a shortcut.
      auto between = [&](const mx::array& active) {
        if (!cfg.early_abort) {
          return true;
        }
        mx::eval(active);
        return mx::any(active).item<bool>();
      };
      loop.run(done, state, ACTIVE, chunk, between);
      bisect_c(state[RS], c, lower, upper);
      bl2 = state[BL2];
      bx = state[BX];
      bz = state[BZ];
      found = state[FOUND];
      mx::eval({c, lower, upper, bl2, bx, bz, found});
    }
  } catch (...) {
    clear();
    throw;
  }

  auto success = attack_success(bz, y, cfg.targeted);
  auto loss = attack_objective(bz, y, LossKind::Margin, cfg.targeted);
  auto norms = batch_norm_of(mx::subtract(bx, x0), Norm::L2);
  auto x_adv = mx::astype(bx, x0_in.dtype());
  mx::eval({x_adv, success, loss, bz, norms});
  return {x_adv, success, loss, bz, norms};
}

} // namespace mlx_robust
