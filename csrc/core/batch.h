// The working batch of early stop: the one implementation every engine uses.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "mlx/mlx.h"

namespace mlx_robust {

namespace mx = mlx::core;

/** A per-sample result: the iterate, its objective, success and logits. */
struct Best {
  mx::array x, loss, success, logits;
};

/** Per sample: keep the first success; among failures keep the highest objective (NaN never
    replaces). `ndim` is x's rank. */
Best keep_best(const Best& old, const Best& cand, int ndim);

/** 0, 1, ..., n - 1: every sample of a batch of n. */
std::vector<int> every_row(int n);

/** An (N,) bool array's flags on the host (evaluated here), whatever its strides. */
std::vector<uint8_t> host_flags(const mx::array& a);

/**
 * The rows of a batch of N samples an engine is still working on: the active samples (global
 * indices, ascending), padded with copies of the first to a power of two, so that a shrinking
 * batch retraces its compiled functions at most log2(N) times. While every sample is active, in
 * order, the batch is the identity: arrays pass through without gathers.
 *
 * Early stop: between chunks, drop() removes the samples that succeeded; once at most half the rows
 * remain the batch shrinks (after the caller merged the leaving rows' results back with
 * to_full() or merge()).
 */
class WorkingBatch {
 public:
  /** Every one of n samples, in order. */
  explicit WorkingBatch(int n);
  /** The samples `active` of n (non-empty, ascending). */
  WorkingBatch(int n, std::vector<int> active);

  int size() const {
    return static_cast<int>(rows_.size());
  }
  bool identity() const {
    return identity_;
  }
  const std::vector<int>& active() const {
    return active_;
  }

  /** This batch's rows (size, ...) of a full-batch array (N, ...). */
  mx::array take(const mx::array& full) const;

  /** The active samples whose flag in `success` (size,) bool, this batch's rows, is false. */
  std::vector<int> unsucceeded(const mx::array& success) const;

  enum class Drop { kept, shrunk, empty };
  /**
   * Early stop between chunks: the active samples that `success` (this batch's rows) does not mark
   * stay. None left: `empty`. At most half the rows left: `flush()` merges the leaving rows' results
   * back, the batch becomes theirs and `state` (this batch's rows) moves to the new rows: `shrunk`.
   * Otherwise nothing changes: `kept`.
   */
  Drop drop(const mx::array& success, std::vector<mx::array>& state, const std::function<void()>& flush);

  /** drop(), then `refill()` (the caller's fixed inputs for the new rows) if the batch shrank;
      false once no sample is left. */
  bool keep_going(const mx::array& success, std::vector<mx::array>& state, const std::function<void()>& flush,
                  const std::function<void()>& refill);

  /** A candidate result in full-batch rows (first occurrence of each sample); samples not in this
      batch get objective -inf and no success, so they never win keep_best. */
  Best to_full(const Best& cand) const;

  /** Each `full` array (N, ...) with this batch's samples replaced by their rows of the matching
      `part` array (size, ...). */
  std::vector<mx::array> merge(const std::vector<mx::array>& part, const std::vector<mx::array>& full) const;

 private:
  void select();

  int n_;
  std::vector<int> active_;
  std::vector<int> rows_;
  bool identity_ = true;
  mx::array idx_ = mx::array(0);
};

} // namespace mlx_robust
