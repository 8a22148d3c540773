// Randomized smoothing (Cohen, Rosenfeld & Kolter 2019, https://arxiv.org/abs/1902.02918):
// Gaussian sampling and vote counting in a compiled loop, then PREDICT and CERTIFY on the counts.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "core/engine.h"
#include "core/scoring.h"
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

struct Votes {
  /** (N, num_classes) int32 votes of the draws with finite logits. */
  mx::array counts;
  /** (N,) int32 draws whose logits held a NaN or an infinity. */
  mx::array nonfinite;
};

/**
 * Owns the compiled vote-counting functions of one model.
 *
 * For input i with key k_i (a row of `keys`), the n noisy copies are drawn in chunks of
 * `batch_size` rows (the last one holds the remainder); chunk c uses key split(k_i, chunks)[c]:
 *
 *   noise_c = normal((rows_c, *sample_shape), 0, sigma, key_c)       (no clipping)
 *   counts_i += bincount(argmax f(params, x_i + noise_c), num_classes)   (rows with finite logits)
 *   nonfinite_i += number of rows of f(params, x_i + noise_c) holding a NaN or an infinity
 *
 * A draw whose logits are not all finite votes for no class (it is counted in `nonfinite` only).
 * Chunk c's key is computed on the host from k_i, the number of chunks and c (the same bits as
 * mx::random::split(k_i, chunks)[c]), so memory stays bounded whatever n is. The counts of an
 * input depend only on its key, n, sigma and batch_size — never on which other inputs share the
 * call (nor on how chunks are grouped, nor on the calling thread). Keys and sigma are inputs of the
 * compiled function, as are the parameters (never captured constants). Without `overlap`, full
 * chunks run up to 8 per compiled call (at most 4096 noisy rows per call, each chunk its own model
 * batch); calls are queued with async_eval, two in flight at most.
 */
class SmoothingEngine : public CompiledEngine {
 public:
  SmoothingEngine() : CompiledEngine(0x534d4f4f5448ull, 1) {}  // "SMOOTH"

  /**
   * Class votes (N, num_classes) int32 of the base classifier under Gaussian noise, n per input,
   * and the number (N,) int32 of draws whose logits were not all finite (they vote for no class:
   * counts.sum(1) + nonfinite == n). `x` is (N, *sample_shape) floating point; `keys` is (N, 2)
   * uint32, one PRNG key per input. Any thread may call it.
   */
  Votes vote_counts(
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
 * `nonfinite` (optional, (N,) integer): draws that voted for no class; a row needs at least one
 * draw (votes + nonfinite >= 1), and a row without any vote abstains.
 */
mx::array smoothed_predict(
    const mx::array& counts, double alpha, const std::optional<mx::array>& nonfinite = std::nullopt);

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
 * 1 - alpha, n = the row sum of `counts` plus `nonfinite` (the estimation draws that voted for no
 * class: they only lower pA); abstain (-1, radius 0) when pA <= 1/2, else radius
 * sigma * Phi^-1(pA). With probability >= 1 - alpha the smoothed classifier predicts cA everywhere
 * in the L2 ball of that radius. `nonfinite0` / `nonfinite` (optional, (N,) integer) are the
 * selection / estimation draws without a vote; each row of each stage needs at least one draw, and
 * a row whose selection draws hold no vote abstains (p_lower 0).
 */
Certificate certify_from_counts(
    const mx::array& counts0,
    const mx::array& counts,
    double sigma,
    double alpha,
    const std::optional<mx::array>& nonfinite0 = std::nullopt,
    const std::optional<mx::array>& nonfinite = std::nullopt);

} // namespace mlx_robust
