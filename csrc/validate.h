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

} // namespace mlx_robust
