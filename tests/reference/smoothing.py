"""Randomized smoothing (Cohen et al. 2019, https://arxiv.org/abs/1902.02918): vote counts,
PREDICT and CERTIFY as plain loops.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx


def vote_counts_reference(
    forward: Callable[[mx.array], mx.array],
    x: mx.array,
    keys: mx.array,
    *,
    n: int,
    sigma: float,
    batch_size: int,
    num_classes: int,
) -> mx.array:
    """Reference of ``SmoothingEngine.vote_counts``: (N, C) int32 votes of ``forward`` under noise.

    Input i draws ``n`` copies in chunks of ``batch_size`` rows (the last one holds the rest);
    chunk c uses key ``split(keys[i], chunks)[c]`` and noise ``normal(scale=sigma)`` (no clipping);
    a draw whose logits are not all finite votes for no class.
    """
    rows = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    classes = mx.arange(num_classes)[None, :]
    out = []
    for i in range(x.shape[0]):
        chunk_keys = mx.random.split(keys[i], len(rows))
        counts = mx.zeros((num_classes,), mx.int32)
        for c, m in enumerate(rows):
            noise = mx.random.normal((m, *x.shape[1:]), scale=sigma, key=chunk_keys[c])
            logits = forward((x[i : i + 1] + noise).astype(x.dtype))
            # A draw with a NaN or an infinity in its logits votes for no class.
            pred = mx.where(mx.all(mx.isfinite(logits), axis=-1), mx.argmax(logits, axis=-1).astype(mx.int32), -1)
            counts = counts + mx.sum(pred[:, None] == classes, axis=0).astype(mx.int32)
            mx.eval(counts)
        out.append(counts)
    return mx.stack(out)


def smoothed_predict_reference(
    counts: mx.array, alpha: float, binom_pvalue: Callable[[int, int], float]
) -> list[int]:
    """PREDICT on vote counts (Cohen et al. 2019): top class (lowest index among ties), or -1 when
    ``binom_pvalue(nA, nA + nB)`` (two-sided test at 1/2) exceeds ``alpha``."""
    out = []
    for row in counts.tolist():
        order = sorted(range(len(row)), key=lambda j: (-row[j], j))
        n_a, n_b = row[order[0]], row[order[1]]
        out.append(-1 if binom_pvalue(n_a, n_a + n_b) > alpha else order[0])
    return out


def certify_reference(
    counts0: mx.array,
    counts: mx.array,
    sigma: float,
    alpha: float,
    lower_bound: Callable[[int, int, float], float],
    ppf: Callable[[float], float],
) -> tuple[list[int], list[float]]:
    """CERTIFY on selection/estimation counts (Cohen et al. 2019): class cA = argmax counts0, pA =
    ``lower_bound(counts[cA], n, alpha)``; (-1, 0) if pA <= 1/2 else (cA, sigma * ppf(pA))."""
    preds, radii = [], []
    for r0, r in zip(counts0.tolist(), counts.tolist()):
        c_a = max(range(len(r0)), key=lambda j: (r0[j], -j))
        p_a = lower_bound(r[c_a], sum(r), alpha)
        if p_a > 0.5:
            preds.append(c_a)
            radii.append(sigma * ppf(p_a))
        else:
            preds.append(-1)
            radii.append(0.0)
    return preds, radii


# --- APGD (Croce & Hein 2020) and Carlini-Wagner L2 (2017): references of csrc/apgd.cpp, cw.cpp ---
