#include "core/graph_rewrite.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "mlx/primitives.h"

namespace mlx_robust {

namespace {

bool env_default() {
  const char* v = std::getenv("MLX_ROBUST_FAST_POOL");
  return v == nullptr || std::strcmp(v, "0") != 0;
}

std::atomic<bool>& enabled_flag() {
  static std::atomic<bool> flag{env_default()};
  return flag;
}

thread_local int tls_last_count = 0;

bool pending(const mx::array& a) {
  return a.has_primitive() && a.status() == mx::array::Status::unscheduled;
}

bool named(const mx::array& a, const char* name) {
  return pending(a) && std::strcmp(a.primitive().name(), name) == 0;
}

/** The strided slices x[:, o1::k1, ..., od::kd, :], one per window offset, in row-major order. */
std::vector<mx::array> window_slices(const mx::array& x, const std::vector<int>& ks, mx::Stream s) {
  const int d = static_cast<int>(ks.size());
  std::vector<mx::array> out;
  std::vector<int> off(d, 0);
  mx::Shape stop = x.shape();
  mx::Shape strides(x.ndim(), 1);
  for (int j = 0; j < d; ++j) {
    strides[j + 1] = ks[j];
  }
  while (true) {
    mx::Shape start(x.ndim(), 0);
    for (int j = 0; j < d; ++j) {
      start[j + 1] = off[j];
    }
    out.push_back(mx::slice(x, start, stop, strides, s));
    int j = d - 1;
    while (j >= 0 && ++off[j] == ks[j]) {
      off[j--] = 0;
    }
    if (j < 0) {
      return out;
    }
  }
}

/** Shape (N, o1, k1, ..., od, kd, C) of x (N, s1, ..., sd, C) split into windows ks. */
mx::Shape split_shape(const mx::Shape& xs, const std::vector<int>& ks, bool keep_windows) {
  mx::Shape out{xs[0]};
  for (size_t j = 0; j < ks.size(); ++j) {
    out.push_back(xs[j + 1] / ks[j]);
    out.push_back(keep_windows ? ks[j] : 1);
  }
  out.push_back(xs.back());
  return out;
}

/**
 * max over non-overlapping windows `ks` of x (N, s1..sd, C) -> (N, s1/k1, ..., sd/kd, C), with the
 * gradient of MLX's Reduce::vjp for Max: mask = (x == max), cotangent / sum(mask) * mask.
 */
mx::array window_max(const mx::array& x, const std::vector<int>& ks, mx::Stream s) {
  auto fwd = [ks, s](const std::vector<mx::array>& in) -> std::vector<mx::array> {
    auto parts = window_slices(in[0], ks, s);
    mx::array m = parts[0];
    for (size_t i = 1; i < parts.size(); ++i) {
      m = mx::maximum(m, parts[i], s);
    }
    return {m};
  };
  auto vjp = [ks, s](
                 const std::vector<mx::array>& primals,
                 const std::vector<mx::array>& cotangents,
                 const std::vector<mx::array>& outputs) -> std::vector<mx::array> {
    const auto& x = primals[0];
    const auto& m = outputs[0];
    // The number of entries equal to the window's maximum, summed exactly in x's dtype.
    std::optional<mx::array> count;
    for (const auto& p : window_slices(x, ks, s)) {
      auto hit = mx::astype(mx::equal(p, m, s), x.dtype(), s);
      count = count ? mx::add(*count, hit, s) : hit;
    }
    auto share = mx::divide(cotangents[0], *count, s);
    auto wide = split_shape(x.shape(), ks, true);
    auto narrow = split_shape(x.shape(), ks, false);
    auto mask = mx::equal(mx::reshape(x, wide, s), mx::reshape(m, narrow, s), s);
    auto g = mx::multiply(mx::reshape(share, narrow, s), mask, s);
    return {mx::reshape(g, x.shape(), s)};
  };
  return mx::custom_vjp(fwd, vjp)({x})[0];
}

struct Match {
  mx::array replacement;
  mx::array pooled;  // x: the rewrite continues below it
};

/** If `r` is max(transpose(reshape(x))) over non-overlapping windows: its replacement and x. */
std::optional<Match> match(const mx::array& r) {
  if (!pending(r)) {
    return std::nullopt;
  }
  auto* red = dynamic_cast<const mx::Reduce*>(&r.primitive());
  if (red == nullptr || red->state().first != mx::Reduce::Max || r.inputs().size() != 1) {
    return std::nullopt;
  }
  const auto& t = r.inputs()[0];
  if (!named(t, "Transpose") || t.inputs().size() != 1) {
    return std::nullopt;
  }
  const auto& sp = t.inputs()[0];
  if (!named(sp, "Reshape") || sp.inputs().size() != 1) {
    return std::nullopt;
  }
  const auto& x = sp.inputs()[0];
  const int d = x.ndim() - 2;
  if (d < 1 || sp.ndim() != 2 * d + 2 || !mx::issubdtype(x.dtype(), mx::floating) || x.size() == 0) {
    return std::nullopt;
  }
  // reshape: (N, s1, .., sd, C) -> (N, s1/k1, k1, ..., sd/kd, kd, C)
  std::vector<int> ks;
  int windows = 1;
  if (sp.shape(0) != x.shape(0) || sp.shape(-1) != x.shape(-1)) {
    return std::nullopt;
  }
  for (int j = 0; j < d; ++j) {
    int o = sp.shape(1 + 2 * j), k = sp.shape(2 + 2 * j);
    if (k < 1 || o * k != x.shape(1 + j)) {
      return std::nullopt;
    }
    ks.push_back(k);
    windows *= k;
  }
  if (windows < 2 || windows > 64) {
    return std::nullopt;
  }
  // transpose: (0, 1, 3, .., 2d-1, 2, 4, .., 2d, 2d+1); max over axes d+1 .. 2d
  std::vector<int> perm{0};
  for (int j = 0; j < d; ++j) {
    perm.push_back(1 + 2 * j);
  }
  for (int j = 0; j < d; ++j) {
    perm.push_back(2 + 2 * j);
  }
  perm.push_back(2 * d + 1);
  if (static_cast<const mx::Transpose&>(t.primitive()).state() != perm) {
    return std::nullopt;
  }
  std::vector<int> axes;
  for (int j = 0; j < d; ++j) {
    axes.push_back(d + 1 + j);
  }
  if (red->state().second != axes) {
    return std::nullopt;
  }
  auto s = r.primitive().stream();
  return Match{mx::reshape(window_max(x, ks, s), r.shape(), s), x};
}

} // namespace

bool fast_pool_enabled() {
  return enabled_flag().load();
}

void set_fast_pool(bool enabled) {
  enabled_flag().store(enabled);
}

int last_rewrite_count() {
  return tls_last_count;
}

mx::array rewrite_window_max(const mx::array& out) {
  tls_last_count = 0;
  if (!fast_pool_enabled()) {
    return out;
  }
  std::unordered_map<std::uintptr_t, Match> repl;
  std::unordered_set<std::uintptr_t> seen;
  // The match of `a` (memoised), or nullopt when `a` is no window max.
  auto replacement = [&](const mx::array& a) -> std::optional<Match> {
    if (auto it = repl.find(a.id()); it != repl.end()) {
      return it->second;
    }
    auto m = match(a);
    if (m) {
      repl.emplace(a.id(), *m);
      tls_last_count++;
    }
    return m;
  };
  mx::array root = out;
  std::vector<mx::array> stack;
  if (auto m = replacement(out)) {
    root = m->replacement;
    stack.push_back(m->pooled);  // its graph may hold more windows
  } else {
    stack.push_back(out);
  }
  while (!stack.empty()) {
    mx::array a = stack.back();
    stack.pop_back();
    if (!pending(a) || !seen.insert(a.id()).second) {
      continue;
    }
    // Siblings (outputs of one multi-output primitive) each hold a copy of the inputs.
    std::vector<mx::array> group{a};
    for (const auto& sib : a.siblings()) {
      group.push_back(sib);
      seen.insert(sib.id());
    }
    for (size_t i = 0; i < a.inputs().size(); ++i) {
      mx::array in = a.inputs()[i];
      if (auto m = replacement(in)) {
        for (auto& g : group) {
          g.inputs()[i] = m->replacement;
        }
        stack.push_back(m->pooled);
      } else {
        stack.push_back(in);
      }
    }
  }
  return root;
}

} // namespace mlx_robust
