// Auto-PGD (APGD-CE, APGD-DLR, APGD-T) on a compiled loop, plus helpers the suite engines share.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core/engine.h"
#include "core/scoring.h"
#include "core/geometry.h"

namespace mlx_robust {

// ---- shared by the suite engines (APGD here, Carlini-Wagner in cw.h) -----------------------

namespace suite {

/** Throw std::invalid_argument("[tag] ...") unless x, y and the bounds describe a valid batch. */
void check_batch(const mx::array& x, const mx::array& y, int num_classes, const char* tag);

} // namespace suite

// ---- APGD ----------------------------------------------------------------------------------

/**
 * Difference of Logits Ratio loss (Croce & Hein 2020, eq. 4), to be maximised:
 *   DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)
 * with z_pi1 >= z_pi2 >= ... the sorted logits. Shift and scale invariant. Needs >= 3 classes.
 */
mx::array dlr_loss(const mx::array& logits, const mx::array& y);

/**
 * Targeted DLR loss (Croce & Hein 2020, eq. 5), to be maximised:
 *   DLR_T(z, y, t) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12).
 * Needs >= 4 classes.
 */
mx::array dlr_loss_targeted(const mx::array& logits, const mx::array& y, const mx::array& target);

enum class ApgdLoss : int { CrossEntropy = 0, DLR = 1 };

/** Parse "ce" / "dlr"; throws std::invalid_argument("[apgd] ...") on anything else. */
ApgdLoss parse_apgd_loss(const std::string& loss);

/**
 * APGD's checkpoints for `steps` iterations: after iteration w_j (1-based) the step size may be
 * halved. w_1 = max(floor(0.22 steps), 1), then intervals shrink by max(floor(0.03 steps), 1) down
 * to max(floor(0.06 steps), 1): p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) with integer
 * rounding as in the authors' code. Returns the w_j <= steps in increasing order.
 */
std::vector<int> apgd_checkpoints(int steps);

struct ApgdConfig {
  Norm norm = Norm::Linf;
  ApgdLoss loss = ApgdLoss::CrossEntropy;
  int steps = 100;
  int restarts = 1;
  /** > 0: APGD-T. One run per target class, the targets being the 2nd, 3rd, ... highest clean
      logits; the objective is the targeted DLR (or -CE(z, t) with loss CE) and success stays
      untargeted (argmax != y). */
  int n_target_classes = 0;
  /** The caller's targets drive the objective and success is argmax == target. */
  bool targeted = false;
  /** Threshold of condition 1: halve when fewer than rho * interval steps increased the loss. */
  float rho = 0.75f;
  /** Drop succeeded samples from the active batch (results unchanged). */
  bool early_stop = true;
  /** Steps per compiled call; 0 picks it by timing one step per input shape. */
  int unroll = 0;
  bool stochastic = false;
  int eot_samples = 1;
};

/**
 * Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble
 * of diverse parameter-free attacks", https://arxiv.org/abs/2003.01690), Algorithm 1:
 *
 *   x0' = random point on the eps-sphere (linf: cube) around x, clipped to [lo, hi]; eta = 2 eps
 *   z = P(x_k + eta * step(grad f(x_k)))
 *   x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))      (no momentum at k = 0)
 *   at each checkpoint w_j: halve eta and restart from x_max when
 *     (1) fewer than rho (w_j - w_{j-1}) steps since w_{j-1} increased f, or
 *     (2) eta and f_max are unchanged since w_{j-1} (not at the first checkpoint).
 *
 * The checkpoint logic runs inside the compiled steps (an input: the chunk's slice of the schedule,
 * built on the host per chunk, so nothing is allocated per step), so every
 * chunk of `unroll` steps is one compiled call and the whole per-sample state travels through it.
 * Per sample the result is the first successful iterate, else the highest-objective one;
 * samples misclassified at x are returned as x. Restarts and APGD-T's target classes run only on
 * the samples not yet broken (with early_stop) and keep each sample's first success.
 */
class ApgdEngine : public CompiledEngine {
 public:
  ApgdEngine() : CompiledEngine(0x41504744, 3) {}  // "APGD"

  /**
   * `y` (N,) true labels; `target` (N,) the targets when config.targeted, else ignored.
   * `eps` (N,) radii; `lo`, `hi` input bounds. Returns x_adv, success, loss, logits, norms.
   */
  AttackOutput run(
      const ForwardFn& forward,
      const std::vector<mx::array>& params,
      const mx::array& x0,
      const mx::array& y,
      const std::optional<mx::array>& target,
      const mx::array& eps,
      const mx::array& lo,
      const mx::array& hi,
      int num_classes,
      const ApgdConfig& config,
      const mx::array& key,
      const std::optional<mx::array>& rows = std::nullopt);
};

} // namespace mlx_robust
