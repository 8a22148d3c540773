// Scoring a model: the checked forward, EOT scores, objectives and success, and the one input
// check every attack engine runs.
#pragma once

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/errors.h"
#include "mlx/mlx.h"

namespace mlx_robust {

namespace mx = mlx::core;

/** The model as a pure function of its flattened parameters and an input batch -> logits (N, C). */
using ForwardFn = std::function<mx::array(const std::vector<mx::array>&, const mx::array&)>;

enum class LossKind : int { CrossEntropy = 0, Margin = 1, KL = 2 };

/**
 * forward(params, x) checked to be floating logits of shape (N, num_classes), returned as float32;
 * otherwise std::invalid_argument("[<where>] model output must have shape ...").
 */
mx::array checked_logits(
    const ForwardFn& forward,
    const std::vector<mx::array>& params,
    const mx::array& x,
    int num_classes,
    const char* where = "attack");

/** Per-sample objective computed from logits (N, C) -> (N,). */
using ObjectiveFn = std::function<mx::array(const mx::array&)>;

/** A model's verdict at an iterate: per-sample objective, success and logits. */
struct Evaluated {
  mx::array loss, success, logits;
};

struct Scored {
  mx::array objective;  // (N,) mean over the draws
  mx::array logits;     // (N, C) mean over the draws
};

/**
 * Per-row draw keys (N, 2) uint32 for a stochastic model: row i's key depends only on `draw_key`
 * (2,) and rows[i], the sample's global index (N,), so its draw is the same whatever batch, working
 * batch or position it is evaluated in. A random defence draws row i from key i
 * (``GaussianNoise.apply`` with an (N, 2) key).
 */
mx::array row_keys(const mx::array& draw_key, const mx::array& rows);

/**
 * Global sample indices (N,) uint32 for an engine: `rows` if given (checked: shape (N,), integer),
 * else 0..N-1. Throws std::invalid_argument("[<where>] rows must ...").
 */
mx::array sample_rows(const std::optional<mx::array>& rows, int n, const char* where);

/**
 * Score x once (deterministic model) or as the mean over `eot_samples` draws of a stochastic
 * model (EOT, Athalye et al. 2018), whose trailing parameter is row_keys(k_e, rows) for keys k_e
 * split from `draw_key`: every sample's draws depend only on `draw_key` and its global index.
 * `where` names the attack in error messages. Every gradient engine scores through this.
 */
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
    const char* where);

/**
 * Check that every label in `y` (N,) lies in [0, num_classes): an out-of-range label would make
 * the gather in the loss, and the scatter in its gradient, touch memory outside the logits.
 * Evaluates `y` (one small host sync). Throws std::invalid_argument("[<where>] ...").
 */
void check_labels(const mx::array& y, int num_classes, const char* where = "attack", const char* name = "y");

/**
 * The inputs of an attack engine's run that check_attack_inputs checks. Optional members (null)
 * are not checked; `target` and `probs` only where the engine uses them.
 */
struct AttackInputs {
  AttackInputs(const mx::array& x_, const mx::array& y_, int num_classes_, const mx::array& lo_,
               const mx::array& hi_, const mx::array* eps_ = nullptr)
      : x(&x_), y(&y_), num_classes(num_classes_), lo(&lo_), hi(&hi_), eps(eps_) {}

  const mx::array* x = nullptr;          // floating, rank >= 2, N >= 1
  const mx::array* y = nullptr;          // (N,) integer labels in [0, num_classes)
  int num_classes = 0;                   // >= 2
  const mx::array* lo = nullptr;         // finite, lo <= hi, broadcastable to x
  const mx::array* hi = nullptr;
  const mx::array* eps = nullptr;        // (N,) finite, >= 0
  const mx::array* step_size = nullptr;  // (N,) finite, >= 0
  const mx::array* target = nullptr;     // (N,) integer targets in [0, num_classes)
  const mx::array* probs = nullptr;      // (N, C) finite, >= 0, rows summing to 1 (+-1e-3)
  const char* y_name = "y";              // what y is called in messages ("y" or "targets")
};

/**
 * What check_attack_inputs could not check without reading the data: small arrays (label ranges,
 * counts of bad values) that `verify` evaluates (unless already evaluated) and turns into
 * std::invalid_argument. Evaluate them with the result to avoid a host round trip.
 */
class PendingInputChecks {
 public:
  PendingInputChecks(std::string tag, std::vector<std::string> what, mx::array facts, mx::array ranges);
  /** The arrays to evaluate (with other work, or by verify). */
  std::vector<mx::array> arrays() const {
    return {facts_, ranges_};
  }
  /** Evaluate (if needed) and throw std::invalid_argument("[tag] ...") on the first bad value. */
  void verify() const;

 private:
  std::string tag_;
  std::vector<std::string> what_;
  mx::array facts_;   // float32: per check, count of bad values then an example bad value
  mx::array ranges_;  // int64: min and max of y, then of target
};

/**
 * The one input check every attack engine (PGD, APGD, C&W, Square) runs, whatever its caller
 * checked: shapes and dtypes now (throws std::invalid_argument("[tag] ...")), and the values
 * (labels and targets in [0, num_classes), finite bounds with lo <= hi, finite eps >= 0, KL
 * probabilities) as a PendingInputChecks. Until verify() passed, an engine must only use labels
 * clipped into range (no gather may read outside the logits).
 */
PendingInputChecks check_attack_inputs(const char* tag, const AttackInputs& in);

/**
 * For the loss helpers called directly (dlr_loss, cw_margin_loss): logits (N, C) floating with
 * C >= min_classes, y (and target, if given) (N,) integers in [0, C). Evaluates the labels.
 */
void check_loss_inputs(const char* tag, const mx::array& logits, const mx::array& y,
                       const std::optional<mx::array>& target, int min_classes);

/** Parse "ce" / "margin" / "kl"; throws on anything else. */
LossKind parse_loss(const std::string& loss);

/**
 * Per-sample attack objective, to be maximised. Untargeted: CE(z, y) or max_{j!=y} z_j - z_y.
 * Targeted (y holds the targets): -CE(z, y) or z_y - max_{j!=y} z_j.
 * KL (TRADES, Zhang et al. 2019): KL(p || softmax(z)) with `probs` = p (N, C), the clean
 * prediction; `targeted` negates it.
 */
mx::array attack_objective(
    const mx::array& logits,
    const mx::array& y,
    LossKind loss,
    bool targeted,
    const std::optional<mx::array>& probs = std::nullopt,
    const std::optional<mx::array>& is_y = std::nullopt);

/** (N, C) bool: column y_i of row i. Pass it to attack_objective as `is_y` to build it once for
    several objectives (a compiled loop builds it once per call instead of once per step). */
mx::array class_mask(const mx::array& y, int num_classes);

/** Per-sample success: argmax != y (untargeted) or argmax == y (targeted). */
mx::array attack_success(const mx::array& logits, const mx::array& y, bool targeted);

/** What every attack engine returns, per sample. */
struct AttackOutput {
  mx::array x_adv;
  mx::array success;
  mx::array loss;
  mx::array logits;
  mx::array norms;
};

} // namespace mlx_robust
