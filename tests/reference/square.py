"""Square attack (Andriushchenko et al. 2020, https://arxiv.org/abs/1912.00049): the counter-based
draws, schedule, window sizes, L2 pattern and the random-search loop.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

from .common import objective


# --- Square attack (Andriushchenko, Croce, Flammarion & Hein 2020) ---------------------------
# The official code's schedule and patterns (github.com/max-andr/square-attack) ported verbatim
# in NumPy, the loop written out per iteration in plain MLX with the C++ core's key derivation.


def _u32(v: int) -> mx.array:
    return mx.array(v, dtype=mx.uint32)


def square_mix32(x: mx.array) -> mx.array:
    """Wellons' lowbias32 on uint32 arrays (as ``mix32`` in csrc/square.cpp)."""
    x = x ^ (x >> 16)
    x = x * _u32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * _u32(0x846CA68B)
    return x ^ (x >> 16)


def square_sample_ids(x: mx.array) -> mx.array:
    """(N,) uint32 content id of each sample: a mixed, position-dependent sum of its float32 bits."""
    n = x.shape[0]
    bits = mx.view(x.astype(mx.float32).reshape(n, -1), mx.uint32)
    d = bits.shape[1]
    pos = square_mix32(mx.arange(d, dtype=mx.uint32) * _u32(0x9E3779B9) + _u32(0x85EBCA6B))
    return square_mix32(mx.sum(square_mix32(bits ^ pos[None]), axis=1))


def square_draws(ids: mx.array, key: mx.array, m: int) -> mx.array:
    """(N, m) uint32 random words of each sample for one iteration key."""
    a, b = key[0], key[1]
    s = square_mix32(square_mix32(ids ^ a) ^ b)
    slots = square_mix32(mx.arange(m, dtype=mx.uint32) * _u32(0x9E3779B9) + _u32(0x632BE5AB))
    return square_mix32(square_mix32(s[:, None] + slots[None]) ^ a)


def square_p_selection(p_init: float, it: int, n_iters: int) -> float:
    """The official code's piecewise-constant schedule of the fraction of pixels changed."""
    it = int(it / n_iters * 10000)
    if 10 < it <= 50:
        p = p_init / 2
    elif 50 < it <= 200:
        p = p_init / 4
    elif 200 < it <= 500:
        p = p_init / 8
    elif 500 < it <= 1000:
        p = p_init / 16
    elif 1000 < it <= 2000:
        p = p_init / 32
    elif 2000 < it <= 4000:
        p = p_init / 64
    elif 4000 < it <= 6000:
        p = p_init / 128
    elif 6000 < it <= 8000:
        p = p_init / 256
    elif 8000 < it <= 10000:
        p = p_init / 512
    else:
        p = p_init
    return p


def square_window_size(p: float, h: int, w: int, c: int, norm: str) -> int:
    """The official window side (L-inf: at most h - 1; L2: odd, >= 3), capped to the image."""
    n_features = c * h * w
    s = int(round(np.sqrt(p * n_features / c)))
    if norm == "linf":
        return min(max(s, 1), max(min(h, w) - 1, 1))
    s = max(s, 3)
    if s % 2 == 0:
        s += 1
    return min(s, min(h, w))


def _pseudo_gaussian_pert_rectangles(x: int, y: int) -> np.ndarray:
    delta = np.zeros([x, y])
    if x == 0:
        return delta
    x_c, y_c = x // 2 + 1, y // 2 + 1
    counter2 = [x_c - 1, y_c - 1]
    for counter in range(0, max(x_c, y_c)):
        delta[max(counter2[0], 0) : min(counter2[0] + (2 * counter + 1), x),
              max(0, counter2[1]) : min(counter2[1] + (2 * counter + 1), y)] += 1.0 / (counter + 1) ** 2
        counter2[0] -= 1
        counter2[1] -= 1
    delta /= np.sqrt(np.sum(delta**2, keepdims=True))
    return delta


def square_pattern(s: int, transpose: bool = False) -> np.ndarray:
    """The official meta_pseudo_gaussian_pert (two sub-squares), (s, s) float64, unit L2 norm."""
    delta = np.zeros([s, s])
    delta[: s // 2] = _pseudo_gaussian_pert_rectangles(s // 2, s)
    delta[s // 2 :] = _pseudo_gaussian_pert_rectangles(s - s // 2, s) * (-1)
    delta /= np.sqrt(np.sum(delta**2, keepdims=True))
    return delta.T if transpose else delta


def _bit(words: mx.array, k: int = 0) -> np.ndarray:
    return ((np.array(words) >> k) & 1) == 1


def square_reference(
    forward: Callable[[mx.array], mx.array],
    x0: mx.array,
    y: mx.array,
    eps: mx.array,
    lo: float,
    hi: float,
    *,
    norm: str = "linf",
    loss: str = "margin",
    n_queries: int = 100,
    p_init: float = 0.8,
    targeted: bool = False,
    key: mx.array,
) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array]:
    """Reference Square attack on NHWC images; returns (x_adv, success, loss, logits, queries).

    Same draws and arithmetic as ``csrc/square.cpp`` (keys: ``split(key, n_queries)``, row 0 for
    the initialisation, row 1 + i for iteration i), written as the obvious loop over all samples:
    no compilation, no early stop.
    """
    n, h, w, c = x0.shape
    x0 = x0.astype(mx.float32)
    y = y.astype(mx.int32)
    eps4 = eps.astype(mx.float32).reshape(n, 1, 1, 1)
    ids = square_sample_ids(x0)
    keys = mx.random.split(key, n_queries)

    def score(x: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        logits = forward(x).astype(mx.float32)
        pred = mx.argmax(logits, axis=-1)
        success = (pred == y) if targeted else (pred != y)
        return -objective(logits, y, loss, targeted), success, logits

    # Initialisation.
    if norm == "linf":
        u = square_draws(ids, keys[0], w * c)
        sign = mx.array(np.where(_bit(u), 1.0, -1.0).astype(np.float32).reshape(n, 1, w, c))
        x1 = mx.clip(x0 + eps4 * sign, lo, hi)
    else:
        side = max(min(h, w) // 5, 1)
        nh, nw = h // side, w // side
        sh, sw = (h - nh * side) // 2, (w - nw * side) // 2
        q = nh * nw
        u = np.array(square_draws(ids, keys[0], q * c)).reshape(n, q, c)
        delta = np.zeros((n, h, w, c), np.float32)
        plain, flipped = square_pattern(side).astype(np.float32), square_pattern(side, True).astype(np.float32)
        for ti in range(nh):
            for tj in range(nw):
                t = ti * nw + tj
                r, cc = sh + ti * side, sw + tj * side
                for i in range(n):
                    pat = flipped if (u[i, t, 0] >> 1) & 1 else plain
                    signs = np.where(u[i, t] & 1, 1.0, -1.0).astype(np.float32)
                    delta[i, r : r + side, cc : cc + side, :] = pat[:, :, None] * signs
        delta = mx.array(delta)
        unit = delta / mx.maximum(mx.sqrt(mx.sum(mx.square(delta), axis=(1, 2, 3), keepdims=True)), 1e-12)
        x1 = mx.clip(x0 + unit * eps4, lo, hi)
    clean_l, clean_s, clean_z = score(x0)
    l1, s1, z1 = score(x1)
    bx = mx.where(clean_s.reshape(n, 1, 1, 1), x0, x1)
    bl = mx.where(clean_s, clean_l, l1)
    bs = clean_s | s1
    bz = mx.where(clean_s[:, None], clean_z, z1)
    bq = mx.where(clean_s, 0, 1).astype(mx.int32)

    hh = np.arange(h)[None, :, None]
    ww = np.arange(w)[None, None, :]

    def window(r: np.ndarray, col: np.ndarray, s: int) -> np.ndarray:
        r, col = r[:, None, None], col[:, None, None]
        return ((hh >= r) & (hh < r + s) & (ww >= col) & (ww < col + s))[..., None]  # (N, H, W, 1)

    for it in range(n_queries - 1):
        s = square_window_size(square_p_selection(p_init, it, n_queries), h, w, c, norm)
        u = np.array(square_draws(ids, keys[1 + it], 2 + c if norm == "linf" else 5 + c))
        r1 = (u[:, 0] % np.uint32(h - s + 1)).astype(np.int64)
        c1 = (u[:, 1] % np.uint32(w - s + 1)).astype(np.int64)
        m1 = window(r1, c1, s)
        if norm == "linf":
            plus, minus = mx.clip(x0 + eps4, lo, hi), mx.clip(x0 - eps4, lo, hi)
            pn, mn, bn = np.array(plus), np.array(minus), np.array(bx)
            chosen = np.zeros((n, c), bool)
            for i in range(n):
                win = m1[i, :, :, 0]
                same_plus = [bool(np.all(np.abs(pn[i][win, ch] - bn[i][win, ch]) < np.float32(1e-7))) for ch in range(c)]
                same_minus = [bool(np.all(np.abs(mn[i][win, ch] - bn[i][win, ch]) < np.float32(1e-7))) for ch in range(c)]
                chosen[i] = (u[i, 2:] & 1) == 1  # no candidate changes the window: the first
                for k in range(32):  # the official code redraws the signs until the window changes
                    bits = ((u[i, 2:] >> k) & 1) == 1
                    if not all(same_plus[ch] if bits[ch] else same_minus[ch] for ch in range(c)):
                        chosen[i] = bits
                        break
            x_new = mx.where(mx.array(m1), mx.where(mx.array(chosen.reshape(n, 1, 1, c)), plus, minus), bx)
        else:
            r2 = (u[:, 2] % np.uint32(h - s + 1)).astype(np.int64)
            c2 = (u[:, 3] % np.uint32(w - s + 1)).astype(np.int64)
            m1f = mx.array(m1.astype(np.float32))
            m2f = mx.array(window(r2, c2, s).astype(np.float32))
            mu = mx.maximum(m1f, m2f)
            d = bx - x0
            norm_w1 = mx.sqrt(mx.sum(mx.square(d * m1f), axis=(1, 2), keepdims=True))
            norm_img = mx.sqrt(mx.sum(mx.square(d), axis=(1, 2, 3), keepdims=True))
            norm_union = mx.sqrt(mx.sum(mx.square(d * mu), axis=(1, 2), keepdims=True))
            pat = np.zeros((n, h, w, 1), np.float32)
            for i in range(n):
                p = square_pattern(s, bool(u[i, 4] & 1)).astype(np.float32)
                pat[i, r1[i] : r1[i] + s, c1[i] : c1[i] + s, 0] = p
            sign = mx.array(np.where(u[:, 5:] & 1, 1.0, -1.0).astype(np.float32).reshape(n, 1, 1, c))
            nd = mx.array(pat) * sign + (d * m1f) / (norm_w1 + 1e-10)
            budget = mx.maximum(mx.square(eps4) - mx.square(norm_img), 0.0) / float(c) + mx.square(norm_union)
            nd = nd / mx.maximum(mx.sqrt(mx.sum(mx.square(nd), axis=(1, 2), keepdims=True)), 1e-12) * mx.sqrt(budget)
            d2 = d * (1.0 - mu) + nd
            unit = d2 / mx.maximum(mx.sqrt(mx.sum(mx.square(d2), axis=(1, 2, 3), keepdims=True)), 1e-12)
            x_new = mx.clip(x0 + unit * eps4, lo, hi)
        l_new, s_new, z_new = score(x_new)
        live = mx.logical_not(bs)
        accept = live & (l_new < bl)
        bq = bq + live.astype(mx.int32)
        bx = mx.where(accept.reshape(n, 1, 1, 1), x_new, bx)
        bl = mx.where(accept, l_new, bl)
        bz = mx.where(accept[:, None], z_new, bz)
        bs = bs | (accept & s_new)
        mx.eval(bx, bl, bs, bz, bq)
    return bx, bs, -bl, bz, bq
