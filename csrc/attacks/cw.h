// Carlini & Wagner L2 attack on a compiled Adam loop.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "core/engine.h"
#include "core/scoring.h"

namespace mlx_robust {

struct CwConfig {
  int steps = 100;
  int binary_search_steps = 5;
  /** Initial trade-off constant c of every sample. */
  float initial_const = 1.0f;
  /** Confidence kappa: success needs a logit margin of at least kappa. */
  float kappa = 0.0f;
  /** Adam learning rate on w (betas 0.9, 0.999, epsilon 1e-8 as in the authors' code). */
  float lr = 0.01f;
  /** Per sample, stop when the objective did not improve by 0.01% over steps/10 steps. */
  bool early_abort = true;
  /** y holds the targets: minimise max(max_{j!=t} Z_j - Z_t, -kappa). */
  bool targeted = false;
  /** Steps per compiled call; 0 picks it by timing one step per input shape. */
  int unroll = 0;
  bool stochastic = false;
  int eot_samples = 1;
};

/**
 * The margin loss of Carlini & Wagner (2017, eq. f_6), minimised by the attack:
 * untargeted max(Z_y - max_{j!=y} Z_j, -kappa), targeted max(max_{j!=t} Z_j - Z_t, -kappa).
 */
mx::array cw_margin_loss(const mx::array& logits, const mx::array& y, float kappa, bool targeted);

/**
 * Carlini & Wagner L2 (2017, "Towards Evaluating the Robustness of Neural Networks",
 * https://arxiv.org/abs/1608.04644). With x' = lo + (hi - lo) (tanh(w) + 1) / 2, per sample:
 *
 *   minimise_w  ||x' - x||_2^2 + c * f(x')          (Adam, `steps` steps from w = atanh(x))
 *
 * with f = cw_margin_loss. A binary search over c (`binary_search_steps` rounds, starting at
 * `initial_const`; x10 while no success is known) follows each round; every round restarts Adam
 * from x. Early abort: a sample stops when its objective at a check (every steps/10 steps) is above
 * 0.9999 times the one at the previous check. The result per sample is the smallest-L2 x' whose
 * logit margin reached kappa, or x itself (no success unless x is already misclassified).
 * Everything is per sample, so a batch gives the same result as its samples one by one.
 */
class CwEngine : public CompiledEngine {
 public:
  CwEngine() : CompiledEngine(0x43573200, 2) {}  // "CW2"

  /** Returns x_adv, success, loss (the logit margin at x_adv, higher = stronger), logits, L2 norms. */
  AttackOutput run(
      const ForwardFn& forward,
      const std::vector<mx::array>& params,
      const mx::array& x0,
      const mx::array& y,
      const mx::array& lo,
      const mx::array& hi,
      int num_classes,
      const CwConfig& config,
      const mx::array& key,
      const std::optional<mx::array>& rows = std::nullopt);
};

} // namespace mlx_robust
