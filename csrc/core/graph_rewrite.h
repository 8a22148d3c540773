// Graph rewrites applied to the model's traced forward before the core differentiates or compiles
// it: equivalent formulations of slow patterns, exact to the bit in values and gradients.
#pragma once

#include "mlx/mlx.h"

namespace mlx_robust {

namespace mx = mlx::core;

/** Whether forward graphs are rewritten (default on; MLX_ROBUST_FAST_POOL=0 at import turns it off). */
bool fast_pool_enabled();
void set_fast_pool(bool enabled);

/**
 * Rewrite every non-overlapping window max (what `nn.MaxPool1d/2d/3d` builds when the stride equals
 * the kernel and divides the input: reshape -> transpose -> max over the window axes) in the
 * not-yet-evaluated graph that produces `out`, and return `out` (or its replacement when `out` is
 * itself such a max).
 *
 * The replacement takes the elementwise maximum of the k1*...*kd strided slices of the input, with
 * a custom gradient equal to MLX's gradient of `max`: the cotangent split evenly between the
 * entries of a window that equal its maximum. Values and gradients are bit-for-bit the same; on an
 * H100 the benchmark CNN's forward+backward takes 0.46 ms instead of 0.75 ms at batch 128
 * (benchmarks/gpu/profile_pool.py), since MLX reduces the transposed view in slow general kernels
 * and copies in the backward. Nodes already evaluated are left alone. Returns `out` unchanged when
 * rewrites are disabled.
 */
mx::array rewrite_window_max(const mx::array& out);

/** How many window maxima the last rewrite_window_max call on this thread replaced (for tests). */
int last_rewrite_count();

} // namespace mlx_robust
