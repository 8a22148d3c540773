#include "attacks/pgd.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <optional>
#include <stdexcept>


namespace mlx_robust {

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

} // namespace

namespace {

// Compiled-function input layout.
// STEP_KEYS (k, 2): the keys of the chunk's k steps of a stochastic model (rows t0 .. t0 + k - 1 of the
// restart's split(noise key, steps + 1)), indexed from the chunk's start; T0: index of the chunk's
// first step.
// PROBS (N, C): clean probabilities for the KL objective, a dummy otherwise.
// ROWS (N,): each row's global sample index (keys a stochastic model's per-row draws).
enum Slot : int { X = 0, BX, BL, BS, BZ, X0, Y, EPS, ALPHA, LO, HI, STEP_KEYS, PROBS, ROWS, T0, NUM_SLOTS };

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

void check_config(const AttackConfig& cfg, const mx::array& x, const mx::array& y, int num_classes,
                  const mx::array& eps, const mx::array& step_size, const std::optional<mx::array>& probs) {
  if (x.ndim() < 2 || x.shape(0) < 1) {
    throw std::invalid_argument("[attack] x must be a non-empty batch of rank >= 2");
  }
  if (!mx::issubdtype(x.dtype(), mx::floating)) {
    throw std::invalid_argument("[attack] x must be floating point");
  }
  const int n = x.shape(0);
  if (y.ndim() != 1 || y.shape(0) != n) {
    throw std::invalid_argument("[attack] y must have shape (N,) matching x");
  }
  if (eps.ndim() != 1 || eps.shape(0) != n || step_size.ndim() != 1 || step_size.shape(0) != n) {
    throw std::invalid_argument("[attack] eps and step_size must have shape (N,)");
  }
  if (num_classes < 1) {
    throw std::invalid_argument("[attack] num_classes must be >= 1");
  }
  if (!mx::issubdtype(y.dtype(), mx::integer)) {
    throw std::invalid_argument("[attack] y must hold integer class labels");
  }
  if (cfg.steps < 1 || cfg.restarts < 1) {
    throw std::invalid_argument("[attack] steps and restarts must be >= 1");
  }
  if (cfg.early_stop && !cfg.track_best) {
    throw std::invalid_argument("[attack] early_stop needs track_best (it would change the result)");
  }
  if (cfg.loss == LossKind::KL &&
      (!probs || probs->ndim() != 2 || probs->shape(0) != n || probs->shape(1) != num_classes)) {
    throw std::invalid_argument("[attack] loss 'kl' needs probs of shape (N, num_classes)");
  }
  if (cfg.eot_samples < 1) {
    throw std::invalid_argument("[attack] eot_samples must be >= 1");
  }
  if (cfg.unroll < 0) {
    throw std::invalid_argument("[attack] unroll must be >= 0");
  }
}

// One call of AttackEngine::run: the restarts over a working batch, merged into `full`.
struct PgdRun {
  const AttackConfig& cfg;
  const std::vector<mx::array>& params;
  CompiledEngine::StepFn finish;
  std::function<CompiledEngine::StepFn(int)> make_steps;
  ChunkedLoop& loop;
  int n, num_classes;
  mx::array x0, y, eps, alpha, probs, lo, hi, sample_idx;
  HostKey user_key, noise_key;
  Best full;
  PhaseTimer& timer;
  bool merged = false;  // has `full` received a working batch yet?

  // Restart r over the samples `active` (all of them, or those not yet successful).
  void restart(int r, std::vector<int> active) {
    auto start_all = cfg.random_start
        ? random_start(x0, eps, lo, hi, cfg.norm, key_array(split_key(user_key, cfg.restarts, r)))
        : x0;
    // Keys of steps [t, t + k) of split(noise key of restart r, steps + 1) (row `steps` scores the
    // last iterate); a dummy for a deterministic model.
    const HostKey restart_noise = cfg.stochastic ? split_key(noise_key, cfg.restarts, r) : HostKey{0, 0};
    const auto no_keys = mx::zeros({1, 2}, mx::uint32);
    auto keys_of = [&](int64_t t, int64_t k) {
      return cfg.stochastic ? split_rows(restart_noise, static_cast<int64_t>(cfg.steps) + 1, t, t + k) : no_keys;
    };
    WorkingBatch batch(n, std::move(active));
    // A new restart competes from scratch; flush() keeps the earlier best.
    auto start = batch.take(start_all);
    const int size = batch.size();
    std::vector<mx::array> state{start, start, mx::full({size}, -std::numeric_limits<float>::infinity()),
                                 mx::zeros({size}, mx::bool_), mx::zeros({size, num_classes}, mx::float32)};
    std::vector<mx::array> fixed;  // x0, y, eps, alpha, lo, hi, keys, probs, rows
    auto refill = [&] {
      fixed = {batch.take(x0), batch.take(y), batch.take(eps), batch.take(alpha), lo, hi, keys_of(0, 1),
               cfg.loss == LossKind::KL ? batch.take(probs) : probs, batch.take(sample_idx)};
    };
    refill();
    int done = 0;
    auto chunk = [&](int k) {
      fixed[STEP_KEYS - X0] = keys_of(done, k);
      return make_steps(k)(chunk_inputs(state, fixed, done, params));
    };
    auto between = [&](const mx::array& succeeded) {
      auto flush_early = [&] {
        flush(batch, state, fixed, false);
        mx::eval({full.x, full.loss, full.success, full.logits});
      };
      return !cfg.early_stop || batch.keep_going(succeeded, state, flush_early, refill);
    };
    loop.run(done, state, BS, chunk, between);
    timer.mark("steps");
    fixed[STEP_KEYS - X0] = keys_of(cfg.steps, 1);
    state = finish(chunk_inputs(state, fixed, done, params));
    flush(batch, state, fixed, true);
  }

  // Merge the working batch's best into the full arrays (first occurrence of each row).
  void flush(const WorkingBatch& batch, const std::vector<mx::array>& state, const std::vector<mx::array>& fixed,
             bool restart_done) {
    Best cand{state[1], state[2], state[3], state[4]};
    if (cfg.track_best && !restart_done) {
      // Mid-restart (rows leaving on early stop): the objective of the kept iterates, and
      // no claim for rows not yet successful.
      cand.loss = mx::where(cand.success, kept_objective(cand, fixed[1], cfg, fixed[7]),
                            mx::array(-std::numeric_limits<float>::infinity()));
    }
    cand = batch.to_full(cand);
    // The first restart has nothing to compete with.
    full = (cfg.track_best && merged) ? keep_best(full, cand, x0.ndim()) : cand;
    merged = true;
  }
};

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
  check_config(cfg, x0_in, y_in, num_classes, eps_in, step_size_in, probs_in);
  const int n = x0_in.shape(0);
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

  const std::vector<uint64_t> settings{
      static_cast<uint64_t>(cfg.norm), static_cast<uint64_t>(cfg.loss),
      static_cast<uint64_t>(cfg.targeted), static_cast<uint64_t>(cfg.track_best),
      static_cast<uint64_t>(num_classes), static_cast<uint64_t>(cfg.stochastic),
      static_cast<uint64_t>(cfg.eot_samples), static_cast<uint64_t>(freezes(cfg))};
  auto make_steps = [&](int k) {
    return compile_step(kStep, k, settings, [&forward, k, num_classes, &cfg](const std::vector<mx::array>& in) {
      return steps_fn(forward, in, k, num_classes, cfg);
    });
  };
  auto finish = compile_step(kFinish, 0, settings, [&forward, num_classes, &cfg](const std::vector<mx::array>& in) {
    return final_fn(forward, in, num_classes, cfg);
  });
  ChunkedLoop loop(unrolls_, x0.shape(), cfg.steps, cfg.unroll);
  // Random starts use split(key, restarts); a stochastic model's draws use keys split from the
  // other half of split(key), one per step of each restart, so neither depends on the unroll depth.
  // Derived on the host (split_key, bit-identical to mx::random::split), so that no array grows
  // with `restarts` or `steps`: a chunk receives only its own steps' keys.
  const HostKey user_key = host_key(key, "attack");
  // Full-batch best state, merged into after every restart (and on every shrink).
  PgdRun pgd{cfg, params, finish, make_steps, loop, n, num_classes, x0, y,
             mx::astype(eps_in, mx::float32), mx::astype(step_size_in, mx::float32),
             cfg.loss == LossKind::KL ? mx::astype(*probs_in, mx::float32) : mx::zeros({1, 1}, mx::float32),
             mx::astype(lo, mx::float32), mx::astype(hi, mx::float32), sample_idx, user_key,
             split_key(user_key, 2, 1),
             Best{x0, mx::full({n}, -std::numeric_limits<float>::infinity()), mx::zeros({n}, mx::bool_),
                  mx::zeros({n, num_classes}, mx::float32)},
             timer};
  timer.mark("setup");
  try {
    for (int r = 0; r < cfg.restarts; ++r) {
      std::vector<int> active = every_row(n);
      if (cfg.early_stop && r > 0) {
        active = WorkingBatch(n).unsucceeded(pgd.full.success);
        if (active.empty()) {
          break;
        }
      }
      pgd.restart(r, std::move(active));
      timer.mark("finish");
      if (r + 1 < cfg.restarts) {
        // The next restart reads full.success only with early stop (and evaluates it then).
        mx::async_eval({pgd.full.x, pgd.full.loss, pgd.full.success, pgd.full.logits});
      }
    }
  } catch (...) {
    // A failed trace can leave a half-built entry behind: drop this engine's compiled functions.
    clear();
    throw;
  }

  // One host round trip for the whole result, the label check included.
  const auto& full = pgd.full;
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
