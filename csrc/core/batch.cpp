#include "core/batch.h"

#include <algorithm>
#include <limits>
#include <numeric>

#include "core/engine.h"
#include "core/geometry.h"

namespace mlx_robust {

Best keep_best(const Best& old, const Best& cand, int ndim) {
  auto take_new = mx::logical_and(
      mx::logical_not(old.success),
      mx::logical_or(cand.success, mx::greater(cand.loss, old.loss)));
  return {
      mx::where(per_sample(take_new, ndim), cand.x, old.x),
      mx::where(take_new, cand.loss, old.loss),
      mx::logical_or(old.success, cand.success),
      mx::where(mx::expand_dims(take_new, -1), cand.logits, old.logits)};
}

std::vector<int> every_row(int n) {
  std::vector<int> rows(n);
  std::iota(rows.begin(), rows.end(), 0);
  return rows;
}

std::vector<uint8_t> host_flags(const mx::array& a) {
  mx::eval(a);
  if (a.dtype() == mx::bool_ && a.flags().row_contiguous) {
    auto p = a.data<bool>();
    return std::vector<uint8_t>(p, p + a.size());
  }
  auto c = mx::astype(mx::contiguous(a), mx::uint8);
  mx::eval(c);
  auto p = c.data<uint8_t>();
  return std::vector<uint8_t>(p, p + c.size());
}

WorkingBatch::WorkingBatch(int n) : n_(n), active_(every_row(n)) {
  select();
}

WorkingBatch::WorkingBatch(int n, std::vector<int> active) : n_(n), active_(std::move(active)) {
  select();
}

void WorkingBatch::select() {
  const int count = static_cast<int>(active_.size());
  const int size = count == n_ ? n_ : std::min(n_, next_pow2(count));
  rows_ = active_;
  while (static_cast<int>(rows_.size()) < size) {
    rows_.push_back(active_[0]);
  }
  identity_ = size == n_ && count == n_;
  for (int p = 0; identity_ && p < n_; ++p) {
    identity_ = rows_[p] == p;
  }
  idx_ = mx::array(rows_.data(), {size}, mx::int32);
}

mx::array WorkingBatch::take(const mx::array& full) const {
  return identity_ ? full : mx::take(full, idx_, 0);
}

std::vector<int> WorkingBatch::unsucceeded(const mx::array& success) const {
  auto s = host_flags(success);
  std::vector<int> still;
  for (size_t p = 0; p < active_.size(); ++p) {
    if (!s[p]) {
      still.push_back(active_[p]);
    }
  }
  return still;
}

WorkingBatch::Drop WorkingBatch::drop(const mx::array& success, std::vector<mx::array>& state,
                                      const std::function<void()>& flush) {
  auto still = unsucceeded(success);
  if (still.empty()) {
    return Drop::empty;
  }
  if (static_cast<int>(still.size()) * 2 > size()) {
    return Drop::kept;
  }
  flush();  // the leaving rows' results live only in the working batch
  // Each new row's position in this batch (first occurrence).
  std::vector<int> pos_of(n_, -1);
  for (int p = size() - 1; p >= 0; --p) {
    pos_of[rows_[p]] = p;
  }
  active_ = std::move(still);
  select();
  std::vector<int> sel;
  for (int i : rows_) {
    sel.push_back(pos_of[i]);
  }
  auto sel_idx = mx::array(sel.data(), {size()}, mx::int32);
  for (auto& a : state) {
    a = mx::take(a, sel_idx, 0);
  }
  return Drop::shrunk;
}

bool WorkingBatch::keep_going(const mx::array& success, std::vector<mx::array>& state,
                              const std::function<void()>& flush, const std::function<void()>& refill) {
  auto dropped = drop(success, state, flush);
  if (dropped == Drop::shrunk) {
    refill();
  }
  return dropped != Drop::empty;
}

namespace {

// Each sample's first position in the batch (0 if absent) and whether it is present.
std::pair<mx::array, mx::array> positions(int n, const std::vector<int>& active) {
  std::vector<int> pos(n, 0);
  std::vector<uint8_t> present(n, 0);
  for (int p = static_cast<int>(active.size()) - 1; p >= 0; --p) {
    pos[active[p]] = p;
    present[active[p]] = 1;
  }
  return {mx::array(pos.data(), {n}, mx::int32), mx::astype(mx::array(present.begin(), {n}, mx::uint8), mx::bool_)};
}

} // namespace

Best WorkingBatch::to_full(const Best& cand) const {
  if (identity_) {
    return cand;
  }
  auto [pos_idx, mask] = positions(n_, active_);
  return {mx::take(cand.x, pos_idx, 0),
          mx::where(mask, mx::take(cand.loss, pos_idx, 0), mx::array(-std::numeric_limits<float>::infinity())),
          mx::logical_and(mx::take(cand.success, pos_idx, 0), mask),
          mx::take(cand.logits, pos_idx, 0)};
}

std::vector<mx::array> WorkingBatch::merge(const std::vector<mx::array>& part,
                                           const std::vector<mx::array>& full) const {
  if (identity_) {
    return part;
  }
  auto [pos_idx, mask] = positions(n_, active_);
  std::vector<mx::array> out;
  for (size_t a = 0; a < full.size(); ++a) {
    mx::Shape sh(full[a].ndim(), 1);
    sh[0] = n_;
    out.push_back(mx::where(mx::reshape(mask, sh), mx::take(part[a], pos_idx, 0), full[a]));
  }
  return out;
}

} // namespace mlx_robust
