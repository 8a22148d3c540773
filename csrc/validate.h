// Input validation: one fused pass over a batch, with a per-sample report.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "mlx/mlx.h"

namespace mlx_robust {

namespace mx = mlx::core;

/** Thrown for a wrong dtype; the bindings turn it into a Python TypeError. */
struct DTypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

struct ValidationReport {
  int num_samples = 0;
  /** Per-sample counts, shape (N,), int32. */
  mx::array nonfinite = mx::array(0);
  mx::array out_of_range = mx::array(0);
  int64_t total_nonfinite = 0;
  int64_t total_out_of_range = 0;
  /** Indices of the first offending samples (at most `max_indices`). */
  std::vector<int> nonfinite_samples;
  std::vector<int> out_of_range_samples;
  bool ok() const {
    return total_nonfinite == 0 && total_out_of_range == 0;
  }
};

/**
 * Check the structure of a batch (no data is read): rank >= 2, N >= 1, floating dtype, and, when
 * given, the per-sample shape. Throws std::invalid_argument / DTypeError naming `name`.
 */
void check_batch_structure(
    const mx::array& x,
    const std::optional<std::vector<int>>& sample_shape,
    const std::string& name = "x");

/**
 * One fused pass over x: NaN/Inf count and count of finite values outside [lo, hi] per sample.
 * `lo`/`hi` broadcast against one sample. Structure is checked first (see above).
 */
ValidationReport validate_batch(
    const mx::array& x,
    const std::optional<std::vector<int>>& sample_shape,
    const mx::array& lo,
    const mx::array& hi,
    int max_indices = 10,
    const std::string& name = "x");

/** The counts of validate_batch, queued on the device but not yet read. */
struct PendingValidation {
  int num_samples = 0;
  mx::array nonfinite = mx::array(0);
  mx::array out_of_range = mx::array(0);
  mx::array totals = mx::array(0);
};

/**
 * validate_batch in two halves, so that work queued after the first (an attack) need not wait for
 * a host round trip: start_validation checks the structure (throwing as validate_batch does) and
 * queues the counts with async_eval (not when `queue` is false: inside a graph transformation,
 * such as mx.grad of a validated forward, MLX refuses async_eval); finish_validation reads them into the report.
 */
PendingValidation start_validation(
    const mx::array& x,
    const std::optional<std::vector<int>>& sample_shape,
    const mx::array& lo,
    const mx::array& hi,
    const std::string& name = "x",
    bool queue = true);
ValidationReport finish_validation(const PendingValidation& pending, int max_indices = 10);

} // namespace mlx_robust
