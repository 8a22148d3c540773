// The Square attack (Andriushchenko, Croce, Flammarion & Hein 2020): score-based black-box random
// search, compiled. No gradient of the model is ever taken.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "core/engine.h"
#include "core/scoring.h"
#include "core/geometry.h"

namespace mlx_robust {

/**
 * The paper's square-size schedule ("Square Attack", https://arxiv.org/abs/1912.00049, §A / the
 * official code's p_selection): the fraction of pixels changed at iteration `it` (0-based) of a
 * run of `n_queries`. With j = floor(it / n_queries * 10000), p = p_init halved at each of
 * j > 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 (p_init / 512 past 8000).
 * Returns the number of halvings (0..9); p = p_init / 2^level.
 */
int square_level(int it, int n_queries);

/**
 * Side of the square window for fraction p on H x W x C images (computed as the official code
 * does, sqrt(p * C H W / C) in double precision).
 * Linf: round(sqrt(p H W)) clamped to [1, max(min(H, W) - 1, 1)].
 * L2: max(round(sqrt(p H W)), 3), made odd, at most min(H, W).
 * Rounding is half-to-even, as Python's round() in the official code.
 */
int square_window_size(double p, int h, int w, int c, Norm norm);

/**
 * The L2 update's centre-weighted pattern on an s x s window (the official code's
 * meta_pseudo_gaussian_pert with two sub-squares): nested rectangles weighted 1/(k+1)^2 on the top
 * half, their negation on the bottom half, unit L2 norm; `transpose` swaps the halves to left/right.
 * Row-major, s*s values.
 */
std::vector<float> square_pattern(int s, bool transpose);

/** A bijective 32-bit integer mix (Wellons' lowbias32), elementwise on a uint32 array. */
mx::array mix32(const mx::array& x);

/**
 * Per-sample 32-bit identity from the sample's content: a mixed, position-dependent sum over the
 * float32 bit patterns of each row of x (N, ...) -> (N,) uint32. Randomness keyed on it makes a
 * sample's draws independent of the batch it is in and of its position there.
 */
mx::array sample_ids(const mx::array& x);

/**
 * Per-sample random words for one iteration: (N, m) uint32 from the shared iteration key (2,)
 * uint32 (from mx::random::split of the caller's key) and the sample ids (N,). Counter-based
 * (a hash of id, key and slot), so it is compile-safe and needs no random op per sample.
 */
mx::array square_draws(const mx::array& ids, const mx::array& key, int m);

struct SquareConfig {
  Norm norm = Norm::Linf;
  /** Margin (z_y - max_{j!=y} z_j, minimised) or CrossEntropy (log p_y, minimised). */
  LossKind loss = LossKind::Margin;
  /** Model queries per sample: one for the initialisation, n_queries - 1 iterations. */
  int n_queries = 1000;
  double p_init = 0.8;
  bool targeted = false;
  /** Drop succeeded samples from the active batch (same results, fewer forward passes). */
  bool early_stop = true;
  /** Iterations per compiled call; 0 picks it by timing the first call for an input shape. */
  int unroll = 0;
  /** The model is random: forward receives trailing per-row PRNG keys (N, 2) (row_keys of the
      query's key and each sample's global index), one draw per query. */
  bool stochastic = false;
};

struct SquareOutput {
  mx::array x_adv;
  mx::array success;
  mx::array loss;
  mx::array logits;
  mx::array norms;
  /** Queries spent per sample after the clean check: 0 if misclassified already, else
      1 (initialisation) + the iterations until success (at most n_queries). */
  mx::array queries;
};

/**
 * Owns the compiled functions of the Square attack for one model. `run` computes
 *
 *   clean check; x* = init(x)  (Linf: vertical stripes of +-eps; L2: tiles of the pattern)
 *   for i in 0 .. n_queries - 2, for samples not yet misclassified:
 *     s = window size for p(i); per sample a random s x s window (all channels)
 *     Linf: the window set to x0 +- eps per channel (x* + 2 eps rho projected onto the ball);
 *           signs that would leave the window unchanged are redrawn (up to 32 tries)
 *     L2:   a second window cleared, the first set to the pattern plus its old content, scaled so
 *           that ||x_new - x0||_2 = eps
 *     x_new clipped to [lo, hi]; x* = x_new if its loss is lower
 *
 * Inputs must be NHWC (N, H, W, C). Randomness: every draw of sample n at iteration i comes from
 * split(key, n_queries)[i] and the sample's content id (sample_ids), so a sample gets the same
 * result alone, in any batch, at any position, with or without early stop, for any unroll.
 * The window size is an input of the compiled function (one trace per unroll depth and batch size),
 * as is the model's flattened parameter list.
 */
class SquareEngine : public CompiledEngine {
 public:
  SquareEngine() : CompiledEngine(0x5351554152450000ull, 2) {}  // "SQUARE"

  SquareOutput run(
      const ForwardFn& forward,
      const std::vector<mx::array>& params,
      const mx::array& x0,
      const mx::array& y,
      const mx::array& eps,
      const mx::array& lo,
      const mx::array& hi,
      int num_classes,
      const SquareConfig& config,
      const mx::array& key,
      const std::optional<mx::array>& rows = std::nullopt);

 private:
  enum Kind : int { kInit = 0, kStep = 1 };  // compile_step kinds
};

} // namespace mlx_robust
