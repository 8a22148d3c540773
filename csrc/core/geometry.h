// Threat-model geometry: steps, projections, random starts and norms.
#pragma once

#include <string>

#include "mlx/mlx.h"

namespace mlx_robust {

namespace mx = mlx::core;

enum class Norm : int { Linf = 0, L2 = 1 };

/** Parse "linf" / "l2" (what the Python layer passes); anything else throws
    std::invalid_argument("[tag] norm must be ..."), tagged by the caller. */
Norm parse_norm(const std::string& norm, const char* tag = "attack");

/** Reshape a per-sample vector (N,) so it broadcasts against x of rank `ndim`. */
mx::array per_sample(const mx::array& v, int ndim);

/** Per-sample norm of `delta` over all but the first axis: max |.| for Linf, sqrt(sum .^2) for L2. */
mx::array batch_norm_of(const mx::array& delta, Norm norm);

/**
 * Ascent step: x + alpha * sign(g) (Linf) or x + alpha * g / ||g||_2 (L2).
 * `alpha` has shape (N,); a zero gradient gives no step.
 */
mx::array ascent_step(const mx::array& x, const mx::array& grad, const mx::array& alpha, Norm norm);

/** Project x onto the `norm` ball of radius eps (N,) around x0, then clip to [lo, hi]. */
mx::array project(
    const mx::array& x,
    const mx::array& x0,
    const mx::array& eps,
    const mx::array& lo,
    const mx::array& hi,
    Norm norm);

/**
 * Uniform random point in the ball of radius eps (N,) around x0, clipped to [lo, hi].
 * Linf: uniform in the cube. L2: uniform in the ball (Gaussian direction, radius u^(1/d)).
 * The random draw has the shape of one sample and is shared by the batch, so a sample's start
 * depends only on `key`, never on which other samples are in the batch.
 */
mx::array random_start(
    const mx::array& x0,
    const mx::array& eps,
    const mx::array& lo,
    const mx::array& hi,
    Norm norm,
    const mx::array& key);

} // namespace mlx_robust
