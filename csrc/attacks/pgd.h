// PGD / FGSM (Madry et al. 2018): the compiled multi-step attack loop of every gradient attack.
#pragma once

#include <optional>
#include <vector>

#include "core/batch.h"
#include "core/engine.h"
#include "core/geometry.h"
#include "core/graph_rewrite.h"
#include "core/scoring.h"
#include "mlx/mlx.h"

namespace mlx_robust {

struct AttackConfig {
  Norm norm = Norm::Linf;
  LossKind loss = LossKind::CrossEntropy;
  int steps = 10;
  int restarts = 1;
  bool random_start = true;
  bool targeted = false;
  /** Keep, per sample, the first successful iterate of a restart, else its last iterate; across
      restarts, the first success, else the highest objective (without early stop, a deterministic
      model's sample simply stops moving at its first success and is scored at the end).
      false: the last iterate of the last restart (adversarial training). */
  bool track_best = true;
  /** Drop succeeded samples from the active batch (requires track_best; results unchanged). */
  bool early_stop = false;
  /** Steps per compiled call; 0 picks it by timing one step per input shape. */
  int unroll = 0;
  /** The model is random: `forward` receives one extra trailing parameter, per-row PRNG keys
      (N, 2) for the draw (row_keys), and every score averages `eot_samples` draws (Expectation
      over Transformation). */
  bool stochastic = false;
  int eot_samples = 1;
};

/**
 * Owns the compiled step functions of one model. Every gradient attack runs through `run`:
 *
 *   for each restart r (key r of split(key, restarts)):
 *     x = random_start(x0) or x0
 *     repeat `steps` times: g = d objective(f(x)) / dx; keep best; x = project(ascent_step(x, g))
 *     evaluate f at the last x; keep best
 *
 * The step is traced once per input shape and configuration and compiled with `unroll` steps per
 * call; model parameters are inputs of the compiled function, never captured constants.
 */
class AttackEngine : public CompiledEngine {
  // run(): `probs` (N, num_classes) is required by the KL objective and ignored otherwise.
 public:
  AttackEngine() : CompiledEngine(0x504744, 2) {}  // "PGD"

  AttackOutput run(
      const ForwardFn& forward,
      const std::vector<mx::array>& params,
      const mx::array& x0,
      const mx::array& y,
      const mx::array& eps,
      const mx::array& step_size,
      const mx::array& lo,
      const mx::array& hi,
      int num_classes,
      const AttackConfig& config,
      const mx::array& key,
      const std::optional<mx::array>& probs = std::nullopt,
      const std::optional<mx::array>& rows = std::nullopt);

 private:
  enum Kind : int { kStep = 0, kFinish = 1 };  // compile_step kinds
};

} // namespace mlx_robust
