#include "validate.h"

#include "core/engine.h"
#include "core/scoring.h"
#include "mlx/compile_impl.h"

namespace mlx_robust {

namespace {

// "(N, 8, 8, 1)" for a per-sample shape. Messages are built from std::string pieces, never an
// ostringstream: one built that way crashed an in-place g++ 13 build against the mlx-cuda wheel.
// libmlx does not export dtype_to_string.
const char* dtype_name(mx::Dtype t) {
  switch (t) {
    case mx::bool_: return "bool";
    case mx::uint8: return "uint8";
    case mx::uint16: return "uint16";
    case mx::uint32: return "uint32";
    case mx::uint64: return "uint64";
    case mx::int8: return "int8";
    case mx::int16: return "int16";
    case mx::int32: return "int32";
    case mx::int64: return "int64";
    case mx::float16: return "float16";
    case mx::bfloat16: return "bfloat16";
    case mx::float32: return "float32";
    case mx::float64: return "float64";
    case mx::complex64: return "complex64";
    default: return "an unsupported dtype";
  }
}

std::string sample_shape_string(const std::vector<int>& s) {
  std::string out = "(N";
  for (int d : s) {
    out += ", " + std::to_string(d);
  }
  return out + (s.empty() ? ",)" : ")");
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

// The compile-cache id of the validation pass (the address of a static: unique, never reused).
std::uintptr_t compile_id() {
  static const char tag = 0;
  return reinterpret_cast<std::uintptr_t>(&tag);
}

} // namespace

void check_batch_structure(
    const mx::array& x,
    const std::optional<std::vector<int>>& sample_shape,
    const std::string& name) {
  if (!mx::issubdtype(x.dtype(), mx::floating)) {
    throw DTypeError("[validate] " + name +
                     " must be a floating-point array (float32, float16 or bfloat16), got " +
                     dtype_name(x.dtype()));
  }
  if (x.ndim() < 2) {
    throw std::invalid_argument("[validate] " + name + " must be a batch of rank >= 2 (N, ...), got shape " +
                                shape_string(x));
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
      throw std::invalid_argument("[validate] " + name + " has shape " + shape_string(x) +
                                  " but the model expects " + sample_shape_string(*sample_shape));
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
  return finish_validation(start_validation(x, sample_shape, lo, hi, name, false), max_indices);
}

PendingValidation start_validation(
    const mx::array& x,
    const std::optional<std::vector<int>>& sample_shape,
    const mx::array& lo,
    const mx::array& hi,
    const std::string& name,
    bool queue) {
  check_batch_structure(x, sample_shape, name);
  // Compiled (one cache entry per input shape and dtype): on a GPU the checks fuse into a few
  // kernels instead of a dozen, and this runs before every forward of a RobustModel.
  static const auto counts_fn = mx::detail::compile(
      [](const std::vector<mx::array>& in) -> std::vector<mx::array> {
        const auto& v = in[0];
        std::vector<int> axes;
        for (int i = 1; i < v.ndim(); ++i) {
          axes.push_back(i);
        }
        auto finite = mx::isfinite(v);
        auto outside = mx::logical_and(finite, mx::logical_or(mx::less(v, in[1]), mx::greater(v, in[2])));
        // contiguous: a broadcast input gives broadcast (strided) counts, and we index them on the host.
        auto nonfinite = mx::contiguous(mx::astype(mx::sum(mx::logical_not(finite), axes), mx::int32));
        auto out_of_range = mx::contiguous(mx::astype(mx::sum(outside, axes), mx::int32));
        auto totals = mx::stack({mx::sum(mx::astype(nonfinite, mx::int64)),
                                 mx::sum(mx::astype(out_of_range, mx::int64))});
        return {nonfinite, out_of_range, totals};
      },
      compile_id(), false, {});
  auto outs = counts_fn({x, lo, hi});
  PendingValidation p{x.shape(0), outs[0], outs[1], outs[2]};
  if (queue) {
    mx::async_eval({p.nonfinite, p.out_of_range, p.totals});
  }
  return p;
}

ValidationReport finish_validation(const PendingValidation& pending, int max_indices) {
  ValidationReport r;
  r.num_samples = pending.num_samples;
  r.nonfinite = pending.nonfinite;
  r.out_of_range = pending.out_of_range;
  auto totals = pending.totals;
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
