#include "attacks/apgd.h"

#include "core/batch.h"

#include <algorithm>
#include <functional>
#include <map>
#include <limits>
#include <stdexcept>


namespace mlx_robust {

namespace suite {


void check_batch(const mx::array& x, const mx::array& y, int num_classes, const char* tag) {
  std::string t(tag);
  if (x.ndim() < 2 || x.shape(0) < 1) {
    throw std::invalid_argument("[" + t + "] x must be a non-empty batch of rank >= 2");
  }
  if (!mx::issubdtype(x.dtype(), mx::floating)) {
    throw std::invalid_argument("[" + t + "] x must be floating point");
  }
  if (y.ndim() != 1 || y.shape(0) != x.shape(0)) {
    throw std::invalid_argument("[" + t + "] y must have shape (N,) matching x");
  }
  if (num_classes < 2) {
    throw std::invalid_argument("[" + t + "] num_classes must be >= 2, got " + std::to_string(num_classes));
  }
}

} // namespace suite

namespace {

mx::array column(const mx::array& a, int j) {
  return mx::take(a, j, 1);
}

mx::array label_logit(const mx::array& z, const mx::array& y) {
  auto yi = mx::expand_dims(mx::astype(y, mx::int32), -1);
  return mx::squeeze(mx::take_along_axis(z, yi, -1), -1);
}

mx::array max_other(const mx::array& z, const mx::array& y) {
  auto yi = mx::expand_dims(mx::astype(y, mx::int32), -1);
  auto classes = mx::expand_dims(mx::arange(z.shape(-1), mx::int32), 0);
  return mx::max(
      mx::where(mx::equal(classes, yi), mx::array(-std::numeric_limits<float>::infinity()), z), -1);
}

} // namespace

mx::array dlr_loss(const mx::array& logits, const mx::array& y) {
  auto z = mx::astype(logits, mx::float32);
  const int c = z.ndim() == 2 ? z.shape(1) : 0;
  if (c < 3) {
    throw std::invalid_argument("[apgd] the DLR loss needs logits (N, C) with C >= 3 classes, got C = " +
                                std::to_string(c));
  }
  auto s = mx::sort(z, -1);
  auto scale = mx::add(mx::subtract(column(s, c - 1), column(s, c - 3)), mx::array(1e-12f));
  return mx::negative(mx::divide(mx::subtract(label_logit(z, y), max_other(z, y)), scale));
}

mx::array dlr_loss_targeted(const mx::array& logits, const mx::array& y, const mx::array& target) {
  auto z = mx::astype(logits, mx::float32);
  const int c = z.ndim() == 2 ? z.shape(1) : 0;
  if (c < 4) {
    throw std::invalid_argument(
        "[apgd] the targeted DLR loss needs logits (N, C) with C >= 4 classes, got C = " + std::to_string(c));
  }
  auto s = mx::sort(z, -1);
  auto mid = mx::multiply(mx::add(column(s, c - 3), column(s, c - 4)), mx::array(0.5f));
  auto scale = mx::add(mx::subtract(column(s, c - 1), mid), mx::array(1e-12f));
  return mx::negative(mx::divide(mx::subtract(label_logit(z, y), label_logit(z, target)), scale));
}

ApgdLoss parse_apgd_loss(const std::string& loss) {
  if (loss == "ce" || loss == "cross_entropy") {
    return ApgdLoss::CrossEntropy;
  }
  if (loss == "dlr") {
    return ApgdLoss::DLR;
  }
  throw std::invalid_argument("[apgd] loss must be 'ce' or 'dlr', got '" + loss + "'");
}

std::vector<int> apgd_checkpoints(int steps) {
  if (steps < 1) {
    throw std::invalid_argument("[apgd] steps must be >= 1, got " + std::to_string(steps));
  }
  // Integer interval lengths as in the authors' code (auto-attack, autopgd_base.py); 64-bit
  // sums, since w + k can pass 2**31 for steps near it. At most about 20 checkpoints.
  int64_t k = std::max(static_cast<int64_t>(0.22 * steps), int64_t{1});
  const int64_t decrease = std::max(static_cast<int64_t>(0.03 * steps), int64_t{1});
  const int64_t smallest = std::max(static_cast<int64_t>(0.06 * steps), int64_t{1});
  std::vector<int> out;
  int64_t w = 0;
  while (w + k <= steps) {
    w += k;
    out.push_back(static_cast<int>(w));
    k = std::max(k - decrease, smallest);
  }
  return out;
}

namespace {

constexpr float kMomentum = 0.75f;          // Croce & Hein 2020, alpha in eq. (3)

// Compiled-function input layout of the step: the per-sample state, then the fixed inputs.
enum Slot : int {
  X = 0,  // current iterate x_k
  XP,     // previous iterate x_{k-1} (momentum)
  G,      // gradient at x_k
  ETA,    // step size (N,)
  XB,     // x_max: highest-objective iterate of this run
  LB,     // f_max
  GB,     // gradient at x_max
  LP,     // objective at x_k (to count increases)
  NI,     // increases since the last checkpoint
  LBL,    // f_max at the last checkpoint
  RED,    // step size halved at the last checkpoint
  RX,     // result: first successful iterate, else the highest-objective one
  RL,
  RS,
  RZ,
  NUM_STATE,
  X0 = NUM_STATE,
  Y,
  TGT,
  EPS,
  LO,
  HI,
  KEYS,   // (k, 2): draw keys of the chunk's k steps of a stochastic model (rows t0 + 1 .. t0 + k of
          // the run's split(noise key, steps + 1); row 0 scores the start), indexed from the chunk
  ROWS,   // (N,): global sample indices (key a stochastic model's per-row draws)
  CKPT,   // (k,): per step of the chunk, the interval length if it ends at a checkpoint, else 0
  RHO,
  T0,
  NUM_SLOTS
};

// Inputs of the run's first evaluation (at the random start).
enum InitSlot : int { I_START = 0, I_X0, I_Y, I_TGT, I_EPS, I_LO, I_HI, I_KEYS, I_ROWS, I_NUM };

bool toward_target(const ApgdConfig& cfg) {
  return cfg.targeted || cfg.n_target_classes > 0;
}

ObjectiveFn objective_for(const ApgdConfig& cfg, const mx::array& y, const mx::array& tgt) {
  bool toward = toward_target(cfg);
  ApgdLoss loss = cfg.loss;
  return [toward, loss, y, tgt](const mx::array& z) {
    if (loss == ApgdLoss::CrossEntropy) {
      return toward ? attack_objective(z, tgt, LossKind::CrossEntropy, true)
                    : attack_objective(z, y, LossKind::CrossEntropy, false);
    }
    return toward ? dlr_loss_targeted(z, y, tgt) : dlr_loss(z, y);
  };
}

mx::array success_of(const ApgdConfig& cfg, const mx::array& logits, const mx::array& y, const mx::array& tgt) {
  return attack_success(logits, cfg.targeted ? tgt : y, cfg.targeted);
}

struct Point {
  mx::array loss, success, logits, grad;
};

Point evaluate_with_grad(
    const ForwardFn& forward,
    const std::vector<mx::array>& params,
    const mx::array& x,
    int num_classes,
    const ApgdConfig& cfg,
    const mx::array& y,
    const mx::array& tgt,
    const mx::array& draw_key,
    const mx::array& rows) {
  std::optional<Scored> sc;
  auto objective = objective_for(cfg, y, tgt);
  auto fn = [&](const std::vector<mx::array>& xs) -> std::vector<mx::array> {
    sc = score(forward, params, xs[0], num_classes, cfg.stochastic, cfg.eot_samples, draw_key, rows,
                      objective, "apgd");
    return {mx::sum(sc->objective)};
  };
  auto grad = mx::vjp(fn, {x}, {mx::array(1.0f)}).second[0];
  return {sc->objective, success_of(cfg, sc->logits, y, tgt), sc->logits, grad};
}

mx::array draw_key_at(const ApgdConfig& cfg, const mx::array& keys, const mx::array& t) {
  return cfg.stochastic ? mx::take(keys, t, 0) : mx::zeros({2}, mx::uint32);
}

std::vector<mx::array> init_fn(
    const ForwardFn& forward,
    const std::vector<mx::array>& in,
    int num_classes,
    const ApgdConfig& cfg) {
  std::vector<mx::array> params(in.begin() + I_NUM, in.end());
  const auto& x = in[I_START];
  auto p = evaluate_with_grad(forward, params, x, num_classes, cfg, in[I_Y], in[I_TGT],
                              draw_key_at(cfg, in[I_KEYS], mx::array(0, mx::int32)), in[I_ROWS]);
  const int n = x.shape(0);
  auto eta = mx::multiply(in[I_EPS], mx::array(2.0f));
  return {x, x, p.grad, eta, x, p.loss, p.grad, p.loss, mx::zeros({n}, mx::float32), p.loss,
          mx::ones({n}, mx::bool_), x, p.loss, p.success, p.logits};
}

std::vector<mx::array> steps_fn(
    const ForwardFn& forward,
    const std::vector<mx::array>& in,
    int k,
    int num_classes,
    const ApgdConfig& cfg) {
  std::vector<mx::array> params(in.begin() + NUM_SLOTS, in.end());
  std::vector<mx::array> s(in.begin(), in.begin() + NUM_STATE);
  const auto& x0 = in[X0];
  const auto& eps = in[EPS];
  const int nd = x0.ndim();
  for (int j = 0; j < k; ++j) {
    auto t = mx::add(in[T0], mx::array(j, mx::int32));
    auto a = mx::where(mx::equal(t, mx::array(0, mx::int32)), mx::array(1.0f), mx::array(kMomentum));
    auto z = project(ascent_step(s[X], s[G], s[ETA], cfg.norm), x0, eps, in[LO], in[HI], cfg.norm);
    auto moved = mx::add(
        s[X],
        mx::add(mx::multiply(a, mx::subtract(z, s[X])),
                mx::multiply(mx::subtract(mx::array(1.0f), a), mx::subtract(s[X], s[XP]))));
    auto x = project(moved, x0, eps, in[LO], in[HI], cfg.norm);
    auto p = evaluate_with_grad(forward, params, x, num_classes, cfg, in[Y], in[TGT],
                                draw_key_at(cfg, in[KEYS], mx::array(j, mx::int32)), in[ROWS]);

    Best r = keep_best({s[RX], s[RL], s[RS], s[RZ]}, {x, p.loss, p.success, p.logits}, nd);
    auto ni = mx::add(s[NI], mx::astype(mx::greater(p.loss, s[LP]), mx::float32));
    auto improved = mx::greater(p.loss, s[LB]);
    auto xb = mx::where(per_sample(improved, nd), x, s[XB]);
    auto gb = mx::where(per_sample(improved, nd), p.grad, s[GB]);
    auto lb = mx::where(improved, p.loss, s[LB]);

    // Checkpoint (Croce & Hein 2020, §3.1): halve eta and go back to x_max on either condition.
    auto len = mx::take(in[CKPT], mx::array(j, mx::int32), 0);
    auto at_ckpt = mx::greater(len, mx::array(0.0f));
    auto few_increases = mx::less(ni, mx::multiply(in[RHO], len));
    auto stalled = mx::logical_and(mx::logical_not(s[RED]), mx::greater_equal(s[LBL], lb));
    auto reduce = mx::logical_and(at_ckpt, mx::logical_or(few_increases, stalled));
    auto reduce_x = per_sample(reduce, nd);

    s[XP] = s[X];
    s[X] = mx::where(reduce_x, xb, x);
    s[G] = mx::where(reduce_x, gb, p.grad);
    s[ETA] = mx::where(reduce, mx::multiply(s[ETA], mx::array(0.5f)), s[ETA]);
    s[XB] = xb;
    s[LB] = lb;
    s[GB] = gb;
    s[LP] = p.loss;
    s[NI] = mx::where(at_ckpt, mx::array(0.0f), ni);
    s[LBL] = mx::where(at_ckpt, lb, s[LBL]);
    s[RED] = mx::where(at_ckpt, reduce, s[RED]);
    s[RX] = r.x;
    s[RL] = r.loss;
    s[RS] = r.success;
    s[RZ] = r.logits;
  }
  return s;
}

// Start of one run: a random point on the sphere (cube) of radius eps, as in the authors' code;
// one draw of one sample's shape shared by the batch, so a sample's start depends only on `key`.
mx::array apgd_start(
    const mx::array& x0,
    const mx::array& eps,
    const mx::array& lo,
    const mx::array& hi,
    Norm norm,
    const mx::array& key) {
  mx::Shape sample_shape(x0.shape().begin() + 1, x0.shape().end());
  mx::array t(0.0f);
  if (norm == Norm::Linf) {
    t = mx::random::uniform(mx::array(-1.0f), mx::array(1.0f), sample_shape, mx::float32, key);
    t = mx::divide(t, mx::maximum(mx::max(mx::abs(t)), mx::array(1e-12f)));
  } else {
    t = mx::random::normal(sample_shape, mx::float32, 0.0f, 1.0f, key);
    t = mx::divide(t, mx::maximum(mx::sqrt(mx::sum(mx::square(t))), mx::array(1e-12f)));
  }
  return mx::clip(mx::add(x0, mx::multiply(per_sample(eps, x0.ndim()), t)), lo, hi);
}

// The checkpoint schedule (about 20 steps) as interval lengths at the steps that end at a
// checkpoint (1-based step w ends it).
std::map<int, float> checkpoint_lengths(int steps) {
  std::map<int, float> out;
  int prev = 0;
  for (int w : apgd_checkpoints(steps)) {
    out[w] = static_cast<float>(w - prev);
    prev = w;
  }
  return out;
}

// One call of ApgdEngine::run: its runs (restarts x target classes) over a working batch, each
// merged into `full`.
struct ApgdRun {
  const ApgdConfig& cfg;
  const std::vector<mx::array>& params;
  CompiledEngine::StepFn init;
  std::function<CompiledEngine::StepFn(int)> make_steps;
  ChunkedLoop& loop;
  int n, n_runs;
  mx::array x0, eps, lo, hi, sample_idx;
  HostKey start_stream, noise_stream;
  std::map<int, float> ckpt_len;
  mx::array rho;
  Best full;

  // Per step of the chunk [t, t + k): the interval length if the step ends at a checkpoint, else 0.
  mx::array ckpt_of(int t, int k) const {
    std::vector<float> c(k, 0.0f);
    for (auto it = ckpt_len.lower_bound(t + 1); it != ckpt_len.end() && it->first <= t + k; ++it) {
      c[it->first - t - 1] = it->second;
    }
    return mx::array(c.begin(), {k}, mx::float32);
  }

  // Run `run` over the samples `active` with targets `tgt_all` (N,).
  void run(int run, std::vector<int> active, const mx::array& y, const mx::array& tgt_all) {
    auto start_all = apgd_start(x0, eps, lo, hi, cfg.norm, key_array(split_key(start_stream, n_runs, run)));
    // Rows [t, t + k) of the run's split(noise key, steps + 1): row 0 scores the start, row
    // t + 1 step t.
    const HostKey run_noise = cfg.stochastic ? split_key(noise_stream, n_runs, run) : HostKey{0, 0};
    const auto dummy_keys = mx::zeros({1, 2}, mx::uint32);
    auto keys_of = [&](int64_t t, int64_t k) {
      return cfg.stochastic ? split_rows(run_noise, static_cast<int64_t>(cfg.steps) + 1, t, t + k) : dummy_keys;
    };
    WorkingBatch batch(n, std::move(active));
    std::vector<mx::array> fixed;  // x0, y, tgt, eps, lo, hi, keys, rows, ckpt, rho
    auto refill = [&] {
      fixed = {batch.take(x0), batch.take(y), batch.take(tgt_all), batch.take(eps), lo, hi, keys_of(0, 1),
               batch.take(sample_idx), ckpt_of(0, 1), rho};
    };
    refill();
    std::vector<mx::array> in{batch.take(start_all)};
    in.insert(in.end(), fixed.begin(), fixed.begin() + (I_NUM - 1));
    in.insert(in.end(), params.begin(), params.end());
    auto state = init(in);
    int done = 0;
    auto chunk = [&](int k) {
      fixed[KEYS - X0] = keys_of(done + 1, k);
      fixed[CKPT - X0] = ckpt_of(done, k);
      return make_steps(k)(chunk_inputs(state, fixed, done, params));
    };
    auto between = [&](const mx::array& succeeded) {
      return !cfg.early_stop || batch.keep_going(succeeded, state, [&] { flush(batch, state); }, refill);
    };
    loop.run(done, state, RS, chunk, between);
    flush(batch, state);
  }

  // Merge the working batch's result into the full arrays (first occurrence of each row).
  void flush(const WorkingBatch& batch, const std::vector<mx::array>& state) {
    full = keep_best(full, batch.to_full({state[RX], state[RL], state[RS], state[RZ]}), x0.ndim());
    mx::eval({full.x, full.loss, full.success, full.logits});
  }
};

// The settings and shapes (the values are check_attack_inputs'): std::invalid_argument("[apgd] ...").
void check_config(const ApgdConfig& cfg, int n, int num_classes, const mx::array& eps_in,
                  const std::optional<mx::array>& target_in) {
  if (eps_in.ndim() != 1 || eps_in.shape(0) != n) {
    throw std::invalid_argument("[apgd] eps must have shape (N,)");
  }
  if (cfg.steps < 1) {
    throw std::invalid_argument("[apgd] steps must be >= 1, got " + std::to_string(cfg.steps));
  }
  if (cfg.restarts < 1) {
    throw std::invalid_argument("[apgd] restarts must be >= 1, got " + std::to_string(cfg.restarts));
  }
  if (!(cfg.rho > 0.0f && cfg.rho <= 1.0f)) {
    throw std::invalid_argument("[apgd] rho must be in (0, 1], got " + std::to_string(cfg.rho));
  }
  if (cfg.n_target_classes < 0 || cfg.n_target_classes > num_classes - 1) {
    throw std::invalid_argument("[apgd] n_target_classes must be in [0, num_classes - 1] = [0, " +
                                std::to_string(num_classes - 1) + "], got " +
                                std::to_string(cfg.n_target_classes));
  }
  if (cfg.targeted && cfg.n_target_classes > 0) {
    throw std::invalid_argument("[apgd] give either targets (targeted) or n_target_classes (APGD-T), not both");
  }
  if (cfg.targeted && (!target_in || target_in->ndim() != 1 || target_in->shape(0) != n)) {
    throw std::invalid_argument("[apgd] a targeted attack needs targets of shape (N,)");
  }
  if (cfg.loss == ApgdLoss::DLR && num_classes < (toward_target(cfg) ? 4 : 3)) {
    throw std::invalid_argument(std::string("[apgd] loss 'dlr' needs num_classes >= ") +
                                (toward_target(cfg) ? "4 (targeted DLR)" : "3") + ", got " +
                                std::to_string(num_classes));
  }
  if (cfg.eot_samples < 1) {
    throw std::invalid_argument("[apgd] eot_samples must be >= 1, got " + std::to_string(cfg.eot_samples));
  }
  if (cfg.unroll < 0) {
    throw std::invalid_argument("[apgd] unroll must be >= 0, got " + std::to_string(cfg.unroll));
  }
}

} // namespace

AttackOutput ApgdEngine::run(
    const ForwardFn& forward,
    const std::vector<mx::array>& params,
    const mx::array& x0_in,
    const mx::array& y_in,
    const std::optional<mx::array>& target_in,
    const mx::array& eps_in,
    const mx::array& lo,
    const mx::array& hi,
    int num_classes,
    const ApgdConfig& cfg,
    const mx::array& key,
    const std::optional<mx::array>& rows_in) {
  suite::check_batch(x0_in, y_in, num_classes, "apgd");
  const int n = x0_in.shape(0);
  auto sample_idx = sample_rows(rows_in, n, "apgd");
  check_config(cfg, n, num_classes, eps_in, target_in);
  AttackInputs inputs(x0_in, y_in, num_classes, lo, hi, &eps_in);
  if (cfg.targeted) {
    inputs.target = &*target_in;
  }
  auto checks = check_attack_inputs("apgd", inputs);

  CoreLock serial;
  drain_released();
  checks.verify();  // before any label reaches a gather
  auto x0 = mx::astype(x0_in, mx::float32);
  auto y = mx::astype(y_in, mx::int32);
  auto user_target = cfg.targeted ? mx::astype(*target_in, mx::int32) : y;
  auto eps = mx::astype(eps_in, mx::float32);
  auto lo32 = mx::astype(lo, mx::float32);
  auto hi32 = mx::astype(hi, mx::float32);
  const float inf = std::numeric_limits<float>::infinity();

  const std::vector<uint64_t> settings{
      static_cast<uint64_t>(cfg.norm), static_cast<uint64_t>(cfg.loss),
      static_cast<uint64_t>(cfg.targeted), static_cast<uint64_t>(cfg.n_target_classes > 0),
      static_cast<uint64_t>(num_classes), static_cast<uint64_t>(cfg.stochastic),
      static_cast<uint64_t>(cfg.eot_samples)};
  auto clean_fn = compile_step(0, 0, settings, [&forward, num_classes, &cfg](const std::vector<mx::array>& in) {
    std::vector<mx::array> params(in.begin() + 3, in.end());
    return std::vector<mx::array>{
        score(forward, params, in[0], num_classes, cfg.stochastic, cfg.eot_samples, in[1], in[2], nullptr, "apgd")
            .logits};
  });
  auto init = compile_step(1, 0, settings, [&forward, num_classes, &cfg](const std::vector<mx::array>& in) {
    return init_fn(forward, in, num_classes, cfg);
  });
  auto make_steps = [&](int k) {
    return compile_step(2, k, settings, [&forward, k, num_classes, &cfg](const std::vector<mx::array>& in) {
      return steps_fn(forward, in, k, num_classes, cfg);
    });
  };

  const int n_targets = cfg.n_target_classes > 0 ? cfg.n_target_classes : 1;
  // Independent streams: starts, a stochastic model's draws, the clean evaluation's draws; each
  // the row of mx::random::split it always was, derived on the host (split_key) so that nothing
  // is allocated per step or per run.
  const HostKey user_key = host_key(key, "apgd");
  ChunkedLoop loop(unrolls_, x0.shape(), cfg.steps, cfg.unroll);
  ApgdRun apgd{cfg, params, init, make_steps, loop, n, n_targets * cfg.restarts, x0, eps, lo32, hi32,
               sample_idx, split_key(user_key, 3, 0), split_key(user_key, 3, 1),
               checkpoint_lengths(cfg.steps), mx::array(cfg.rho), Best{x0, x0, x0, x0}};
  try {
    // Samples misclassified at x are not attacked (and keep x), as in the authors' code.
    std::vector<mx::array> clean_in{x0, key_array(split_key(user_key, 3, 2)), sample_idx};
    clean_in.insert(clean_in.end(), params.begin(), params.end());
    auto logits0 = clean_fn(clean_in)[0];
    std::optional<mx::array> ranked;  // APGD-T: classes by clean logit, ascending
    if (cfg.n_target_classes > 0) {
      ranked = mx::astype(mx::argsort(logits0, -1), mx::int32);
    }
    auto target_of = [&](int tc) {
      return ranked ? column(*ranked, num_classes - 2 - tc) : user_target;
    };
    auto clean_success = success_of(cfg, logits0, y, user_target);
    auto clean_loss = objective_for(cfg, y, target_of(0))(logits0);
    apgd.full = Best{x0, mx::where(clean_success, clean_loss, mx::array(-inf)), clean_success, logits0};
    mx::eval({apgd.full.x, apgd.full.loss, apgd.full.success, apgd.full.logits});

    for (int run = 0; run < apgd.n_runs; ++run) {
      auto active = cfg.early_stop ? WorkingBatch(n).unsucceeded(apgd.full.success) : every_row(n);
      if (active.empty()) {
        break;
      }
      apgd.run(run, std::move(active), y, target_of(run / cfg.restarts));
    }
  } catch (...) {
    clear();
    throw;
  }

  const auto& full = apgd.full;
  auto norms = batch_norm_of(mx::subtract(full.x, x0), cfg.norm);
  auto x_adv = mx::astype(full.x, x0_in.dtype());
  mx::eval({x_adv, norms, full.success, full.loss, full.logits});
  return {x_adv, full.success, full.loss, full.logits, norms};
}

} // namespace mlx_robust
