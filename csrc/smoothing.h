// Randomized smoothing (Cohen, Rosenfeld & Kolter 2019, https://arxiv.org/abs/1902.02918):
// Gaussian sampling and vote counting in a compiled loop, then PREDICT and CERTIFY on the counts.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <vector>

#include "attack.h"
#include "mlx/mlx.h"

namespace mlx_robust {

namespace mx = mlx::core;

/** Rows of each model batch for `n` noisy copies of one input: full batches, then the remainder. */
std::vector<int> chunk_rows(int64_t n, int batch_size);

struct VoteConfig {
  /** Noisy copies per input (>= 1). */
  int64_t n = 1000;
  /** Noise standard deviation (> 0), in input units. */
  float sigma = 0.25f;
  /** Rows per model call (>= 1): bounds memory whatever `n` is. */
  int batch_size = 1000;
  int num_classes = 0;
  /** Draw the noise on a stream of its own so that it overlaps the model's compute. */
  bool overlap = true;
};

/**
 * Owns the compiled vote-counting functions of one model.
 *
 * For input i with key k_i (a row of `keys`), the n noisy copies are drawn in chunks of
 * `batch_size` rows (the last one holds the remainder); chunk c uses key split(k_i, chunks)[c]:
 *
 *   noise_c = normal((rows_c, *sample_shape), 0, sigma, key_c)       (no clipping)
 *   counts_i += bincount(argmax f(params, x_i + noise_c), num_classes)
 *
 * so the counts of an input depend only on its key, n, sigma and batch_size — never on which other
 * inputs share the call (nor on how chunks are grouped). Keys and sigma are inputs of the compiled
 * function, as are the parameters (never captured constants). Without `overlap`, full chunks run
 * up to 8 per compiled call (at most 4096 noisy rows per call, each chunk its own model batch);
 * calls are queued with async_eval, two in flight at most.
 */
class SmoothingEngine : public CompiledEngine {
 public:
  SmoothingEngine() : CompiledEngine(1) {}

  /**
   * Class votes (N, num_classes) int32 of the base classifier under Gaussian noise, n per input.
   * `x` is (N, *sample_shape) floating point; `keys` is (N, 2) uint32, one PRNG key per input.
   */
  mx::array vote_counts(
      const ForwardFn& forward,
      const std::vector<mx::array>& params,
      const mx::array& x,
      const mx::array& keys,
      const VoteConfig& config);
};

/**
 * PREDICT (Cohen et al. 2019, Algorithm "PREDICT"): per row of `counts` (N, C), the top class cA
 * (lowest index among ties) unless the two-sided binomial test of the top two counts nA, nB
 * against 1/2 has p-value > alpha, then -1 (abstain). Returns (N,) int32.
 */
mx::array smoothed_predict(const mx::array& counts, double alpha);

struct Certificate {
  /** (N,) int32 class, -1 where CERTIFY abstains. */
  mx::array prediction;
  /** (N,) float32 certified L2 radius sigma * Phi^-1(pA), 0 where abstained. */
  mx::array radius;
  /** (N,) float32 lower confidence bound pA of the top class's probability. */
  mx::array p_lower;
};

/**
 * CERTIFY (Cohen et al. 2019, Algorithm "CERTIFY"): cA = argmax of the selection counts
 * `counts0` (N, C); pA = one-sided Clopper-Pearson lower bound of counts[cA] out of n at level
 * 1 - alpha, n = the row sum of `counts`; abstain (-1, radius 0) when pA <= 1/2, else radius
 * sigma * Phi^-1(pA). With probability >= 1 - alpha the smoothed classifier predicts cA everywhere
 * in the L2 ball of that radius.
 */
Certificate certify_from_counts(const mx::array& counts0, const mx::array& counts, double sigma, double alpha);

} // namespace mlx_robust
