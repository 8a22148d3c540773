"""Carlini & Wagner L2 (2017, https://arxiv.org/abs/1608.04644): margin loss and the tanh-space
Adam loop with binary search over c.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from .common import _per_sample


def cw_margin_loss(logits: mx.array, y: mx.array, kappa: float = 0.0, targeted: bool = False) -> mx.array:
    """Carlini-Wagner margin f to minimise: max(Z_y - max_{j!=y} Z_j, -kappa) (targeted: reversed)."""
    z = logits.astype(mx.float32)
    zy = mx.take_along_axis(z, y.astype(mx.int32)[:, None], axis=-1)[:, 0]
    is_y = mx.arange(z.shape[-1])[None, :] == y[:, None]
    other = mx.max(mx.where(is_y, -mx.inf, z), axis=-1)
    return mx.maximum(other - zy if targeted else zy - other, -kappa)


def cw_reference(
    forward: Callable[[mx.array], mx.array],
    x0: mx.array,
    y: mx.array,
    lo: float,
    hi: float,
    *,
    c: float = 1.0,
    kappa: float = 0.0,
    steps: int = 100,
    lr: float = 0.01,
    binary_search_steps: int = 5,
    early_abort: bool = True,
    targeted: bool = False,
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """Carlini & Wagner L2 (2017) as the obvious loop; returns (x_adv, success, l2_squared, logits).

    Adam (0.9, 0.999, 1e-8) on w with x' = lo + (hi - lo)(tanh w + 1)/2, objective
    ||x' - x||^2 + c f(x'), binary search on c per sample, per-sample early abort, and per sample the
    smallest-L2 x' whose margin reached kappa (else x).
    """
    n, nd = x0.shape[0], x0.ndim
    y = y.astype(mx.int32)
    axes = tuple(range(1, nd))
    onehot = mx.arange(0, 1)  # set below, once the number of classes is known

    def kappa_success(z):
        shift = mx.where(onehot, -kappa if targeted else kappa, 0.0)
        pred = mx.argmax(z + shift, axis=-1)
        return pred == y if targeted else pred != y

    def to_x(w):
        return mx.clip(lo + (hi - lo) * ((mx.tanh(w) + 1.0) * 0.5), lo, hi)

    def total(w, cc):
        xa = to_x(w)
        z = forward(xa).astype(mx.float32)
        l2 = mx.sum(mx.square(xa - x0), axis=axes)
        per = l2 + cc * cw_margin_loss(z, y, kappa, targeted)
        return mx.sum(per), (xa, z, l2, per)

    grad_fn = mx.value_and_grad(lambda w, cc: total(w, cc)[0])
    logits0 = forward(x0).astype(mx.float32)
    onehot = mx.arange(logits0.shape[-1])[None, :] == y[:, None]
    found = kappa_success(logits0)
    best_l2 = mx.where(found, 0.0, mx.inf)
    best_x, best_z = x0, logits0
    w0 = mx.arctanh(mx.clip((x0 - lo) / (hi - lo) * 2.0 - 1.0, -1.0, 1.0) * 0.999999)
    const = mx.full((n,), c)
    lower, upper = mx.zeros((n,)), mx.full((n,), 1e10)
    period = max(steps // 10, 1)
    for r in range(binary_search_steps):
        if binary_search_steps >= 10 and r == binary_search_steps - 1:
            const = mx.minimum(upper, 1e10)
        w, m, v = w0, mx.zeros_like(w0), mx.zeros_like(w0)
        round_success, prev, active = mx.zeros((n,), mx.bool_), mx.full((n,), mx.inf), mx.ones((n,), mx.bool_)
        for t in range(steps):
            _, (xa, z, l2, per) = total(w, const)
            _, g = grad_fn(w, const)
            success = mx.logical_and(active, kappa_success(z))
            better = mx.logical_and(success, l2 < best_l2)
            round_success = mx.logical_or(round_success, success)
            best_l2 = mx.where(better, l2, best_l2)
            best_x = mx.where(_per_sample(better, nd), xa, best_x)
            best_z = mx.where(better[:, None], z, best_z)
            found = mx.logical_or(found, better)
            if early_abort and t % period == 0:
                active = mx.logical_and(active, mx.logical_not(per > prev * 0.9999))
                prev = mx.where(active, per, prev)
            step = mx.array(t + 1, mx.float32)
            m_new = 0.9 * m + (1 - 0.9) * g
            v_new = 0.999 * v + (1 - 0.999) * mx.square(g)
            bc1 = 1.0 - mx.power(mx.array(0.9, mx.float32), step)
            bc2 = 1.0 - mx.power(mx.array(0.999, mx.float32), step)
            w_new = w - lr * ((m_new / bc1) / (mx.sqrt(v_new / bc2) + 1e-8))
            act = _per_sample(active, nd)
            w, m, v = mx.where(act, w_new, w), mx.where(act, m_new, m), mx.where(act, v_new, v)
            mx.eval(w, m, v, best_l2, best_x, best_z, found, round_success, prev, active)
        upper = mx.where(round_success, mx.minimum(upper, const), upper)
        lower = mx.where(round_success, lower, mx.maximum(lower, const))
        const = mx.where(upper < 1e9, (lower + upper) * 0.5, mx.where(round_success, const, const * 10.0))
    pred = mx.argmax(best_z, axis=-1)
    success = pred == y if targeted else pred != y
    mx.eval(best_x, success, best_l2, best_z)
    return best_x, success, best_l2, best_z
