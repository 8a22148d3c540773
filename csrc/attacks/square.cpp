#include "attacks/square.h"

#include "core/batch.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>


namespace mlx_robust {

namespace {

mx::array u32(uint32_t v) {
  return mx::array(v, mx::uint32);
}

// Rectangles nested around the centre of an x-by-y block, ring k weighted 1/(k+1)^2, unit norm
// (the official code's pseudo_gaussian_pert_rectangles). Row-major, in double precision.
std::vector<double> pseudo_gaussian_rectangles(int x, int y) {
  std::vector<double> d(static_cast<size_t>(x) * y, 0.0);
  if (x == 0 || y == 0) {
    return d;
  }
  int xc = x / 2 + 1, yc = y / 2 + 1;
  int c0 = xc - 1, c1 = yc - 1;
  for (int k = 0; k < std::max(xc, yc); ++k) {
    for (int i = std::max(c0, 0); i < std::min(c0 + 2 * k + 1, x); ++i) {
      for (int j = std::max(c1, 0); j < std::min(c1 + 2 * k + 1, y); ++j) {
        d[static_cast<size_t>(i) * y + j] += 1.0 / ((k + 1.0) * (k + 1.0));
      }
    }
    c0 -= 1;
    c1 -= 1;
  }
  double ss = 0.0;
  for (double v : d) {
    ss += v * v;
  }
  double nrm = std::sqrt(ss);
  for (double& v : d) {
    v /= nrm;
  }
  return d;
}

// Square tiles of the L2 initialisation on an H x W canvas: side max(min(H, W) / 5, 1), the full
// tiles centred. qmap holds each pixel's tile index (-1 outside every tile); `a` the pattern of the
// tile at each pixel, `b` the transposed pattern.
struct InitTiles {
  std::vector<float> a, b;
  std::vector<int32_t> qmap;
  int count = 0;
};

InitTiles l2_init_tiles(int h, int w) {
  int s = std::max(std::min(h, w) / 5, 1);
  int nh = h / s, nw = w / s;
  int sh = (h - nh * s) / 2, sw = (w - nw * s) / 2;
  auto pat = square_pattern(s, false);
  auto pat_t = square_pattern(s, true);
  InitTiles t;
  t.a.assign(static_cast<size_t>(h) * w, 0.0f);
  t.b.assign(static_cast<size_t>(h) * w, 0.0f);
  t.qmap.assign(static_cast<size_t>(h) * w, -1);
  t.count = nh * nw;
  for (int ti = 0; ti < nh; ++ti) {
    for (int tj = 0; tj < nw; ++tj) {
      for (int i = 0; i < s; ++i) {
        for (int j = 0; j < s; ++j) {
          size_t at = static_cast<size_t>(sh + ti * s + i) * w + (sw + tj * s + j);
          t.a[at] = pat[i * s + j];
          t.b[at] = pat_t[i * s + j];
          t.qmap[at] = ti * nw + tj;
        }
      }
    }
  }
  return t;
}

constexpr int kLevels = 10;  // p_init / 2^0 .. p_init / 2^9
constexpr float kUnchanged = 1e-7f;  // the official code's "this draw changes nothing" tolerance


// Loss to minimise (the negated attack objective), success and logits at x. A random model gets
// the trailing per-row keys row_keys(noise_key, rows): each sample's draw depends on its global index.
Evaluated square_score(
    const ForwardFn& forward,
    const std::vector<mx::array>& params,
    const mx::array& x,
    const mx::array& y,
    int num_classes,
    const SquareConfig& cfg,
    const mx::array& noise_key,
    const mx::array& rows) {
  std::vector<mx::array> p(params);
  if (cfg.stochastic) {
    p.push_back(row_keys(noise_key, rows));
  }
  auto logits = checked_logits(forward, p, x, num_classes, "square");
  auto loss = mx::negative(attack_objective(logits, y, cfg.loss, cfg.targeted));
  return {loss, attack_success(logits, y, cfg.targeted), logits};
}

// Bool mask (N, H, W, 1) of the s x s windows with top-left corners (r, c), each (N,) int32.
mx::array window_mask(int h, int w, const mx::array& r, const mx::array& c, const mx::array& s) {
  int n = r.shape(0);
  auto hh = mx::reshape(mx::arange(h, mx::int32), {1, h, 1, 1});
  auto ww = mx::reshape(mx::arange(w, mx::int32), {1, 1, w, 1});
  auto r4 = mx::reshape(r, {n, 1, 1, 1});
  auto c4 = mx::reshape(c, {n, 1, 1, 1});
  auto in_h = mx::logical_and(mx::greater_equal(hh, r4), mx::less(hh, mx::add(r4, s)));
  auto in_w = mx::logical_and(mx::greater_equal(ww, c4), mx::less(ww, mx::add(c4, s)));
  return mx::logical_and(in_h, in_w);
}

// Uniform offset in [0, extent - s] from a random word (modulo bias < 2^-20 for images).
mx::array offset_of(const mx::array& word, int extent, const mx::array& s) {
  auto range = mx::astype(mx::add(mx::subtract(mx::array(extent, mx::int32), s), mx::array(1, mx::int32)), mx::uint32);
  return mx::astype(mx::remainder(word, range), mx::int32);
}

mx::array column(const mx::array& u, int j) {
  return mx::take(u, j, 1);
}

mx::array columns(const mx::array& u, int from, int count) {
  return mx::slice(u, {0, from}, {u.shape(0), from + count});
}

mx::array bit0(const mx::array& words) {
  return mx::equal(mx::bitwise_and(words, u32(1)), u32(1));
}

// Draws per sample and iteration.
int step_words(Norm norm, int c) {
  return norm == Norm::Linf ? 2 + c : 5 + c;
}

mx::array linf_candidate(
    const mx::array& x0,
    const mx::array& bx,
    const mx::array& eps4,
    const mx::array& lo,
    const mx::array& hi,
    const mx::array& u,
    const mx::array& s) {
  int n = x0.shape(0), h = x0.shape(1), w = x0.shape(2), c = x0.shape(3);
  auto mask = window_mask(h, w, offset_of(column(u, 0), h, s), offset_of(column(u, 1), w, s), s);
  auto plus = mx::clip(mx::add(x0, eps4), lo, hi);
  auto minus = mx::clip(mx::subtract(x0, eps4), lo, hi);
  // Does setting channel c of the window to x0 +- eps leave it as it is? (N, C) each.
  auto unchanged = [&](const mx::array& v) {
    auto diff = mx::where(mask, mx::abs(mx::subtract(v, bx)), mx::array(0.0f));
    return mx::less(mx::max(diff, {1, 2}), mx::array(kUnchanged));
  };
  auto same_plus = mx::expand_dims(unchanged(plus), 1);
  auto same_minus = mx::expand_dims(unchanged(minus), 1);
  // 32 candidate sign vectors, one per bit of each channel's word; take the first that changes
  // the window (the official code redraws until one does), else the first.
  auto shifts = mx::reshape(mx::arange(32, mx::uint32), {1, 32, 1});
  auto words = mx::expand_dims(columns(u, 2, c), 1);
  auto is_plus = mx::equal(mx::bitwise_and(mx::right_shift(words, shifts), u32(1)), u32(1));
  auto stuck = mx::all(mx::where(is_plus, same_plus, same_minus), 2);
  auto first = mx::argmax(mx::astype(mx::logical_not(stuck), mx::int32), 1);
  auto chosen = mx::take_along_axis(is_plus, mx::reshape(mx::astype(first, mx::int32), {n, 1, 1}), 1);
  chosen = mx::reshape(chosen, {n, 1, 1, c});
  return mx::where(mask, mx::where(chosen, plus, minus), bx);
}

mx::array sum_hw(const mx::array& a) {
  return mx::sum(a, {1, 2}, true);
}

mx::array l2_norm4(const mx::array& a) {
  return mx::sqrt(mx::sum(mx::square(a), {1, 2, 3}, true));
}

mx::array l2_candidate(
    const mx::array& x0,
    const mx::array& bx,
    const mx::array& eps4,
    const mx::array& lo,
    const mx::array& hi,
    const mx::array& u,
    const mx::array& s,
    const mx::array& level,
    const mx::array& table) {
  int n = x0.shape(0), h = x0.shape(1), w = x0.shape(2), c = x0.shape(3);
  auto r1 = offset_of(column(u, 0), h, s);
  auto c1 = offset_of(column(u, 1), w, s);
  auto m1 = mx::astype(window_mask(h, w, r1, c1, s), mx::float32);
  auto m2 = mx::astype(window_mask(h, w, offset_of(column(u, 2), h, s), offset_of(column(u, 3), w, s), s), mx::float32);
  auto mu = mx::maximum(m1, m2);
  auto d = mx::subtract(bx, x0);
  auto norm_w1 = mx::sqrt(sum_hw(mx::square(mx::multiply(d, m1))));
  auto norm_img = l2_norm4(d);
  auto norm_union = mx::sqrt(sum_hw(mx::square(mx::multiply(d, mu))));

  // The window's pattern (or its transpose), shifted to each sample's window.
  auto coin = mx::astype(mx::bitwise_and(column(u, 4), u32(1)), mx::int32);
  auto slot = mx::add(mx::multiply(level, mx::array(2, mx::int32)), coin);
  auto pats = mx::take(table, slot, 0);
  auto hh = mx::reshape(mx::arange(h, mx::int32), {1, h, 1});
  auto ww = mx::reshape(mx::arange(w, mx::int32), {1, 1, w});
  auto ri = mx::clip(mx::subtract(hh, mx::reshape(r1, {n, 1, 1})), mx::array(0, mx::int32), mx::array(h - 1, mx::int32));
  auto ci = mx::clip(mx::subtract(ww, mx::reshape(c1, {n, 1, 1})), mx::array(0, mx::int32), mx::array(w - 1, mx::int32));
  auto idx = mx::reshape(mx::add(mx::multiply(ri, mx::array(w, mx::int32)), ci), {n, h * w});
  auto pat = mx::multiply(mx::reshape(mx::take_along_axis(pats, idx, 1), {n, h, w, 1}), m1);
  auto sign = mx::where(mx::reshape(bit0(columns(u, 5, c)), {n, 1, 1, c}), mx::array(1.0f), mx::array(-1.0f));

  auto nd = mx::add(mx::multiply(pat, sign), mx::divide(mx::multiply(d, m1), mx::add(norm_w1, mx::array(1e-10f))));
  auto budget = mx::add(
      mx::divide(mx::maximum(mx::subtract(mx::square(eps4), mx::square(norm_img)), mx::array(0.0f)),
                 mx::array(static_cast<float>(c))),
      mx::square(norm_union));
  nd = mx::multiply(mx::divide(nd, mx::maximum(mx::sqrt(sum_hw(mx::square(nd))), mx::array(1e-12f))), mx::sqrt(budget));
  auto d2 = mx::add(mx::multiply(d, mx::subtract(mx::array(1.0f), mu)), nd);
  auto unit = mx::divide(d2, mx::maximum(l2_norm4(d2), mx::array(1e-12f)));
  return mx::clip(mx::add(x0, mx::multiply(unit, eps4)), lo, hi);
}

mx::array linf_init(const mx::array& x0, const mx::array& eps4, const mx::array& lo, const mx::array& hi,
                    const mx::array& ids, const mx::array& key) {
  int n = x0.shape(0), w = x0.shape(2), c = x0.shape(3);
  auto u = square_draws(ids, key, w * c);
  auto sign = mx::where(mx::reshape(bit0(u), {n, 1, w, c}), mx::array(1.0f), mx::array(-1.0f));
  return mx::clip(mx::add(x0, mx::multiply(eps4, sign)), lo, hi);
}

mx::array l2_init(const mx::array& x0, const mx::array& eps4, const mx::array& lo, const mx::array& hi,
                  const mx::array& ids, const mx::array& key) {
  int n = x0.shape(0), h = x0.shape(1), w = x0.shape(2), c = x0.shape(3);
  auto tiles = l2_init_tiles(h, w);
  auto u = mx::reshape(square_draws(ids, key, tiles.count * c), {n, tiles.count, c});
  auto qmap = mx::array(tiles.qmap.data(), {h * w}, mx::int32);
  auto q = mx::maximum(qmap, mx::array(0, mx::int32));
  auto sign = mx::where(bit0(u), mx::array(1.0f), mx::array(-1.0f));                      // (N, Q, C)
  auto coin = mx::equal(mx::bitwise_and(mx::right_shift(mx::take(u, 0, 2), u32(1)), u32(1)), u32(1));  // (N, Q)
  auto a = mx::reshape(mx::array(tiles.a.data(), {h * w}, mx::float32), {1, h * w});
  auto b = mx::reshape(mx::array(tiles.b.data(), {h * w}, mx::float32), {1, h * w});
  auto shape_px = mx::where(mx::take(coin, q, 1), b, a);                                    // (N, HW)
  auto delta = mx::multiply(mx::take(sign, q, 1), mx::expand_dims(shape_px, -1));         // (N, HW, C)
  delta = mx::reshape(delta, {n, h, w, c});
  auto unit = mx::divide(delta, mx::maximum(l2_norm4(delta), mx::array(1e-12f)));
  return mx::clip(mx::add(x0, mx::multiply(unit, eps4)), lo, hi);
}

// Compiled-function input layouts.
enum InitSlot : int { I_X0 = 0, I_Y, I_EPS, I_LO, I_HI, I_SID, I_KEY, I_ROWS, I_NUM };
// KEYS (k, 2): the chunk's iteration keys; ITER (k, 3) int32: level, window size, valid;
// TABLE (2 * kLevels, H * W): L2 patterns per level, plain and transposed, top-left of the canvas.
// ROWS (N,): global sample indices (key a random model's per-row draws).
enum StepSlot : int { BX = 0, BL, BS, BZ, BQ, X0, Y, EPS, LO, HI, SID, KEYS, ITER, TABLE, ROWS, S_NUM };

std::vector<mx::array> params_of(const std::vector<mx::array>& in, int from) {
  return std::vector<mx::array>(in.begin() + from, in.end());
}

std::vector<mx::array> init_fn(const ForwardFn& forward, const std::vector<mx::array>& in, int num_classes,
                               const SquareConfig& cfg) {
  auto params = params_of(in, I_NUM);
  const auto& x0 = in[I_X0];
  const auto& y = in[I_Y];
  auto eps4 = per_sample(in[I_EPS], 4);
  auto noise = mx::random::split(in[I_KEY], 3);
  auto clean = square_score(forward, params, x0, y, num_classes, cfg, mx::take(noise, 1, 0), in[I_ROWS]);
  auto x1 = cfg.norm == Norm::Linf ? linf_init(x0, eps4, in[I_LO], in[I_HI], in[I_SID], in[I_KEY])
                                   : l2_init(x0, eps4, in[I_LO], in[I_HI], in[I_SID], in[I_KEY]);
  auto first = square_score(forward, params, x1, y, num_classes, cfg, mx::take(noise, 2, 0), in[I_ROWS]);
  // Samples misclassified already keep x0 and spend no query.
  const auto& done = clean.success;
  return {mx::where(per_sample(done, 4), x0, x1),
          mx::where(done, clean.loss, first.loss),
          mx::logical_or(done, first.success),
          mx::where(mx::expand_dims(done, -1), clean.logits, first.logits),
          mx::where(done, mx::array(0, mx::int32), mx::array(1, mx::int32))};
}

std::vector<mx::array> step_fn(const ForwardFn& forward, const std::vector<mx::array>& in, int k, int num_classes,
                               const SquareConfig& cfg) {
  auto params = params_of(in, S_NUM);
  const auto& x0 = in[X0];
  const auto& y = in[Y];
  int c = x0.shape(3);
  auto eps4 = per_sample(in[EPS], 4);
  auto bx = in[BX], bl = in[BL], bs = in[BS], bz = in[BZ], bq = in[BQ];
  for (int j = 0; j < k; ++j) {
    auto row = mx::take(in[ITER], j, 0);
    auto level = mx::take(row, 0);
    auto s = mx::take(row, 1);
    auto valid = mx::astype(mx::take(row, 2), mx::bool_);
    auto key = mx::take(in[KEYS], j, 0);
    auto u = square_draws(in[SID], key, step_words(cfg.norm, c));
    auto x_new = cfg.norm == Norm::Linf ? linf_candidate(x0, bx, eps4, in[LO], in[HI], u, s)
                                        : l2_candidate(x0, bx, eps4, in[LO], in[HI], u, s, level, in[TABLE]);
    auto cand = square_score(forward, params, x_new, y, num_classes, cfg, mx::random::split(key).second, in[ROWS]);
    auto live = mx::logical_and(valid, mx::logical_not(bs));
    auto accept = mx::logical_and(live, mx::less(cand.loss, bl));
    bq = mx::add(bq, mx::astype(live, mx::int32));
    bx = mx::where(per_sample(accept, 4), x_new, bx);
    bl = mx::where(accept, cand.loss, bl);
    bz = mx::where(mx::expand_dims(accept, -1), cand.logits, bz);
    bs = mx::logical_or(bs, mx::logical_and(accept, cand.success));
  }
  return {bx, bl, bs, bz, bq};
}

// L2: per level, the window's pattern and its transpose on an (h, w) canvas: (2 kLevels, h w).
mx::array pattern_table(const std::vector<int>& size_of_level, int h, int w) {
  std::vector<float> t(static_cast<size_t>(2 * kLevels) * h * w, 0.0f);
  for (int l = 0; l < kLevels; ++l) {
    int s = size_of_level[l];
    for (int tr = 0; tr < 2; ++tr) {
      auto pat = square_pattern(s, tr == 1);
      float* canvas = t.data() + static_cast<size_t>(2 * l + tr) * h * w;
      for (int i = 0; i < s; ++i) {
        for (int j = 0; j < s; ++j) {
          canvas[i * w + j] = pat[i * s + j];
        }
      }
    }
  }
  return mx::array(t.data(), {2 * kLevels, h * w}, mx::float32);
}

// Keys of iterations [t, t + k): rows 1 + i of split(key, iters + 1), zeros past the last
// (padding rows of invalid iterations).
mx::array iteration_keys(HostKey user_key, int iters, int64_t t, int k) {
  const int64_t n_keys = static_cast<int64_t>(iters) + 1;
  std::vector<uint32_t> words(static_cast<size_t>(k) * 2, 0u);
  for (int j = 0; j < k && t + j < iters; ++j) {
    auto kj = split_key(user_key, n_keys, t + j + 1);
    words[2 * j] = kj.first;
    words[2 * j + 1] = kj.second;
  }
  return mx::array(words.begin(), {k, 2}, mx::uint32);
}

// Per iteration of [t, t + k): (level, window size, valid) as (k, 3) int32.
mx::array iteration_schedule(const std::vector<int>& size_of_level, int n_queries, int iters, int64_t t, int k) {
  std::vector<int32_t> info(static_cast<size_t>(k) * 3);
  for (int j = 0; j < k; ++j) {
    int64_t i = t + j;
    int level = i < iters ? square_level(static_cast<int>(i), n_queries) : 0;
    info[3 * j] = level;
    info[3 * j + 1] = size_of_level[level];
    info[3 * j + 2] = i < iters ? 1 : 0;
  }
  return mx::array(info.data(), {k, 3}, mx::int32);
}

// The settings and shapes (the values are check_attack_inputs'): std::invalid_argument("[square] ...").
void check_config(const SquareConfig& cfg, const mx::array& x0_in, const mx::array& y_in,
                  const mx::array& eps_in, int num_classes, const mx::array& key) {
  if (x0_in.ndim() != 4) {
    throw std::invalid_argument(
        "[square] x must be a batch of NHWC images (N, H, W, C), got rank " + std::to_string(x0_in.ndim()));
  }
  if (x0_in.size() == 0) {
    throw std::invalid_argument("[square] x must be a non-empty batch");
  }
  if (!mx::issubdtype(x0_in.dtype(), mx::floating)) {
    throw std::invalid_argument("[square] x must be floating point");
  }
  const int n = x0_in.shape(0);
  if (y_in.ndim() != 1 || y_in.shape(0) != n) {
    throw std::invalid_argument("[square] y must have shape (N,) matching x");
  }
  if (eps_in.ndim() != 1 || eps_in.shape(0) != n) {
    throw std::invalid_argument("[square] eps must have shape (N,)");
  }
  if (num_classes < 1) {
    throw std::invalid_argument("[square] num_classes must be >= 1");
  }
  if (cfg.n_queries < 1) {
    throw std::invalid_argument("[square] n_queries must be >= 1, got " + std::to_string(cfg.n_queries));
  }
  if (!(cfg.p_init > 0.0 && cfg.p_init <= 1.0)) {
    throw std::invalid_argument("[square] p_init must be in (0, 1], got " + std::to_string(cfg.p_init));
  }
  if (cfg.loss != LossKind::Margin && cfg.loss != LossKind::CrossEntropy) {
    throw std::invalid_argument("[square] loss must be 'margin' or 'ce'");
  }
  if (cfg.unroll < 0) {
    throw std::invalid_argument("[square] unroll must be >= 0");
  }
  if (key.ndim() != 1 || key.shape(0) != 2 || key.dtype() != mx::uint32) {
    throw std::invalid_argument("[square] key must be a PRNG key (shape (2,), uint32)");
  }
}

} // namespace

int square_level(int it, int n_queries) {
  static const int bounds[] = {10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000};
  int j = static_cast<int>(static_cast<double>(it) / n_queries * 10000.0);
  int level = 0;
  for (int b : bounds) {
    level += j > b ? 1 : 0;
  }
  return level;
}

int square_window_size(double p, int h, int w, int c, Norm norm) {
  double n_features = static_cast<double>(c) * h * w;
  int s = static_cast<int>(std::nearbyint(std::sqrt(p * n_features / c)));
  int side = std::min(h, w);
  if (norm == Norm::Linf) {
    return std::min(std::max(s, 1), std::max(side - 1, 1));
  }
  s = std::max(s, 3);
  if (s % 2 == 0) {
    s += 1;
  }
  return std::min(s, side);
}

std::vector<float> square_pattern(int s, bool transpose) {
  std::vector<double> d(static_cast<size_t>(s) * s, 0.0);
  int top = s / 2;
  auto upper = pseudo_gaussian_rectangles(top, s);
  auto lower = pseudo_gaussian_rectangles(s - top, s);
  for (int i = 0; i < top; ++i) {
    for (int j = 0; j < s; ++j) {
      d[i * s + j] = upper[i * s + j];
    }
  }
  for (int i = top; i < s; ++i) {
    for (int j = 0; j < s; ++j) {
      d[i * s + j] = -lower[(i - top) * s + j];
    }
  }
  double ss = 0.0;
  for (double v : d) {
    ss += v * v;
  }
  double nrm = std::sqrt(ss);
  std::vector<float> out(d.size());
  for (int i = 0; i < s; ++i) {
    for (int j = 0; j < s; ++j) {
      out[i * s + j] = static_cast<float>(transpose ? d[j * s + i] / nrm : d[i * s + j] / nrm);
    }
  }
  return out;
}

mx::array mix32(const mx::array& x_in) {
  auto x = mx::bitwise_xor(x_in, mx::right_shift(x_in, u32(16)));
  x = mx::multiply(x, u32(0x7feb352du));
  x = mx::bitwise_xor(x, mx::right_shift(x, u32(15)));
  x = mx::multiply(x, u32(0x846ca68bu));
  return mx::bitwise_xor(x, mx::right_shift(x, u32(16)));
}

mx::array sample_ids(const mx::array& x) {
  int n = x.shape(0);
  auto flat = mx::reshape(mx::astype(x, mx::float32), {n, -1});
  auto bits = mx::view(flat, mx::uint32);
  int d = flat.shape(1);
  auto pos = mix32(mx::add(mx::multiply(mx::arange(d, mx::uint32), u32(0x9e3779b9u)), u32(0x85ebca6bu)));
  auto e = mix32(mx::bitwise_xor(bits, mx::reshape(pos, {1, d})));
  return mix32(mx::sum(e, 1));
}

mx::array square_draws(const mx::array& ids, const mx::array& key, int m) {
  auto a = mx::take(key, 0);
  auto b = mx::take(key, 1);
  auto s = mix32(mx::bitwise_xor(mix32(mx::bitwise_xor(ids, a)), b));
  auto slots = mix32(mx::add(mx::multiply(mx::arange(m, mx::uint32), u32(0x9e3779b9u)), u32(0x632be5abu)));
  auto z = mix32(mx::add(mx::expand_dims(s, 1), mx::reshape(slots, {1, m})));
  return mix32(mx::bitwise_xor(z, a));
}

SquareOutput SquareEngine::run(
    const ForwardFn& forward,
    const std::vector<mx::array>& params,
    const mx::array& x0_in,
    const mx::array& y_in,
    const mx::array& eps_in,
    const mx::array& lo,
    const mx::array& hi,
    int num_classes,
    const SquareConfig& cfg,
    const mx::array& key,
    const std::optional<mx::array>& rows_in) {
  check_config(cfg, x0_in, y_in, eps_in, num_classes, key);
  const int n = x0_in.shape(0), h = x0_in.shape(1), w = x0_in.shape(2), c = x0_in.shape(3);
  auto sample_idx = sample_rows(rows_in, n, "square");
  AttackInputs inputs(x0_in, y_in, num_classes, lo, hi, &eps_in);
  auto checks = check_attack_inputs("square", inputs);

  CoreLock serial;
  drain_released();
  checks.verify();  // before any label reaches a gather
  auto x0 = mx::astype(x0_in, mx::float32);
  auto y = mx::astype(y_in, mx::int32);
  auto eps = mx::astype(eps_in, mx::float32);
  auto lo32 = mx::astype(lo, mx::float32);
  auto hi32 = mx::astype(hi, mx::float32);
  auto ids = sample_ids(x0);

  const int iters = cfg.n_queries - 1;
  // Rows of split(key, iters + 1), row 0: initialisation; row 1 + i: iteration i. Derived on the
  // host per chunk (split_key, bit-identical), so nothing is allocated per query.
  const HostKey user_key = host_key(key, "square");
  const int64_t n_keys = static_cast<int64_t>(iters) + 1;

  // Per-level window sizes and (L2) the pattern table; per-iteration schedule on the host.
  std::vector<int> size_of_level(kLevels);
  for (int l = 0; l < kLevels; ++l) {
    size_of_level[l] = square_window_size(cfg.p_init / std::ldexp(1.0, l), h, w, c, cfg.norm);
  }
  mx::array table = cfg.norm == Norm::L2 ? pattern_table(size_of_level, h, w) : mx::zeros({1, 1}, mx::float32);

  const std::vector<uint64_t> settings{
      static_cast<uint64_t>(cfg.norm), static_cast<uint64_t>(cfg.loss),
      static_cast<uint64_t>(cfg.targeted), static_cast<uint64_t>(num_classes),
      static_cast<uint64_t>(cfg.stochastic)};
  auto init = compile_step(kInit, 0, settings, [&forward, num_classes, &cfg](const std::vector<mx::array>& in) {
    return init_fn(forward, in, num_classes, cfg);
  });
  auto make_step = [&](int k) {
    return compile_step(kStep, k, settings, [&forward, k, num_classes, &cfg](const std::vector<mx::array>& in) {
      return step_fn(forward, in, k, num_classes, cfg);
    });
  };

  std::vector<mx::array> full;
  try {
    std::vector<mx::array> init_in{x0, y, eps, lo32, hi32, ids, key_array(split_key(user_key, n_keys, 0)), sample_idx};
    init_in.insert(init_in.end(), params.begin(), params.end());
    full = init(init_in);

    int unroll = cfg.unroll > 0 ? cfg.unroll : chosen_unroll(x0.shape());
    if (unroll == 0) {
      // First call for this shape: time one more (compiled) initialisation, two forward passes,
      // and unroll deep only where forward passes are cheap (host-bound), see ARCHITECTURE §2.
      mx::eval(full);
      auto t0 = std::chrono::steady_clock::now();
      mx::eval(init(init_in));
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 2;
      unroll = unrolls_.choose(x0.shape(), ms);
    }
    const int k = std::min(unroll, std::max(iters, 1));
    auto step = make_step(k);

    // Working batch: the samples still being attacked, shrunk on early stop (core/batch.h).
    WorkingBatch batch(n);
    std::vector<mx::array> state = full;
    std::vector<mx::array> fixed{x0, y, eps, ids, sample_idx};
    auto flush = [&] { full = batch.merge(state, full); };
    // Early stop: drop the samples that `success` marks; false once none is left.
    auto keep_going = [&](const mx::array& success) {
      auto flush_early = [&] {
        flush();
        mx::eval(full);
      };
      return batch.keep_going(success, state, flush_early, [&] {
        fixed = {batch.take(x0), batch.take(y), batch.take(eps), batch.take(ids), batch.take(sample_idx)};
      });
    };

    bool finished = cfg.early_stop && iters > 0 && !keep_going(state[BS]);
    for (int64_t t = 0; !finished && t < iters; t += k) {
      check_interrupt();
      std::vector<mx::array> in{
          state[BX], state[BL], state[BS], state[BZ], state[BQ], fixed[0], fixed[1], fixed[2], lo32, hi32,
          fixed[3], iteration_keys(user_key, iters, t, k), iteration_schedule(size_of_level, cfg.n_queries, iters, t, k),
          table, fixed[4]};
      in.insert(in.end(), params.begin(), params.end());
      auto prev_success = state[BS];
      state = step(in);
      mx::async_eval(state);
      // Successes known one chunk ago (the new chunk is already queued behind them).
      if (cfg.early_stop && t + k < iters && !keep_going(prev_success)) {
        break;
      }
    }
    flush();
  } catch (...) {
    // A failed trace can leave a half-built entry behind: drop this engine's compiled functions.
    clear();
    throw;
  }

  auto norms = batch_norm_of(mx::subtract(full[BX], x0), cfg.norm);
  auto x_adv = mx::astype(full[BX], x0_in.dtype());
  auto objective = mx::negative(full[BL]);
  mx::eval({x_adv, norms, full[BS], objective, full[BZ], full[BQ]});
  return {x_adv, full[BS], objective, full[BZ], norms, full[BQ]};
}

} // namespace mlx_robust
