#include "validate.h"

#include <sstream>

namespace mlx_robust {

namespace {

// "(N, 8, 8, 1)" for a per-sample shape, "(64,)" for a full one. Reads dims one at a time
// (array::shape(i)) rather than through a Shape reference: an in-place build with g++ 13 against
// the mlx-cuda wheel crashed iterating the reference here (measured on the device).
std::string shape_str(const mx::array& x, int first_dim, bool batch) {
  std::ostringstream os;
  os << "(";
  int dims = 0;
  if (batch) {
    os << "N";
    ++dims;
  }
  for (int i = first_dim; i < static_cast<int>(x.ndim()); ++i, ++dims) {
    os << (dims ? ", " : "") << x.shape(i);
  }
  os << (dims == 1 ? ",)" : ")");
  return os.str();
}

std::string shape_str(const std::vector<int>& s) {
  std::ostringstream os;
  os << "(N";
  for (int d : s) {
    os << ", " << d;
  }
  os << (s.empty() ? ",)" : ")");
  return os.str();
}

std::vector<int> first_nonzero(const mx::array& counts, int limit) {
  std::vector<int> out;
  auto c = counts.data<int32_t>();
  for (int i = 0; i < counts.shape(0) && static_cast<int>(out.size()) < limit; ++i) {
    if (c[i] != 0) {
      out.push_back(i);
    }
  }
  return out;
}

} // namespace

void check_batch_structure(
    const mx::array& x,
    const std::optional<std::vector<int>>& sample_shape,
    const std::string& name) {
  if (!mx::issubdtype(x.dtype(), mx::floating)) {
    std::ostringstream os;
    os << "[validate] " << name << " must be a floating-point array (float32, float16 or bfloat16), got "
       << x.dtype();
    throw DTypeError(os.str());
  }
  if (x.ndim() < 2) {
    std::ostringstream os;
    os << "[validate] " << name << " must be a batch of rank >= 2 (N, ...), got shape "
       << shape_str(x, 0, false);
    throw std::invalid_argument(os.str());
  }
  if (x.shape(0) == 0) {
    throw std::invalid_argument("[validate] " + name + " is an empty batch (N = 0)");
  }
  if (sample_shape) {
    bool same = static_cast<int>(x.ndim()) - 1 == static_cast<int>(sample_shape->size());
    for (int i = 1; same && i < static_cast<int>(x.ndim()); ++i) {
      same = x.shape(i) == (*sample_shape)[i - 1];
    }
    if (!same) {
      std::ostringstream os;
      os << "[validate] " << name << " has shape " << shape_str(x, 0, false)
         << " but the model expects " << shape_str(*sample_shape);
      throw std::invalid_argument(os.str());
    }
  }
}

ValidationReport validate_batch(
    const mx::array& x,
    const std::optional<std::vector<int>>& sample_shape,
    const mx::array& lo,
    const mx::array& hi,
    int max_indices,
    const std::string& name) {
  check_batch_structure(x, sample_shape, name);
  std::vector<int> axes;
  for (int i = 1; i < x.ndim(); ++i) {
    axes.push_back(i);
  }
  auto finite = mx::isfinite(x);
  auto outside = mx::logical_and(finite, mx::logical_or(mx::less(x, lo), mx::greater(x, hi)));
  ValidationReport r;
  r.num_samples = x.shape(0);
  // contiguous: a broadcast input gives broadcast (strided) counts, and we index them on the host.
  r.nonfinite = mx::contiguous(mx::astype(mx::sum(mx::logical_not(finite), axes), mx::int32));
  r.out_of_range = mx::contiguous(mx::astype(mx::sum(outside, axes), mx::int32));
  auto totals = mx::stack({mx::sum(mx::astype(r.nonfinite, mx::int64)),
                           mx::sum(mx::astype(r.out_of_range, mx::int64))});
  mx::eval({r.nonfinite, r.out_of_range, totals});
  auto t = totals.data<int64_t>();
  r.total_nonfinite = t[0];
  r.total_out_of_range = t[1];
  if (r.total_nonfinite) {
    r.nonfinite_samples = first_nonzero(r.nonfinite, max_indices);
  }
  if (r.total_out_of_range) {
    r.out_of_range_samples = first_nonzero(r.out_of_range, max_indices);
  }
  return r;
}

} // namespace mlx_robust
