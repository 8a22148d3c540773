"""APGD (Croce & Hein 2020, https://arxiv.org/abs/2003.01690): DLR loss, checkpoints, start and the
step-size-halving loop.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from .common import _per_sample, ascent_step, objective, project


def dlr_loss(logits: mx.array, y: mx.array, target: mx.array | None = None) -> mx.array:
    """DLR loss of Croce & Hein (2020), eq. 4; with ``target`` the targeted DLR (eq. 5)."""
    z = logits.astype(mx.float32)
    s = mx.sort(z, axis=-1)
    zy = mx.take_along_axis(z, y.astype(mx.int32)[:, None], axis=-1)[:, 0]
    if target is None:
        is_y = mx.arange(z.shape[-1])[None, :] == y[:, None]
        other = mx.max(mx.where(is_y, -mx.inf, z), axis=-1)
        return -((zy - other) / (s[:, -1] - s[:, -3] + 1e-12))
    zt = mx.take_along_axis(z, target.astype(mx.int32)[:, None], axis=-1)[:, 0]
    return -((zy - zt) / (s[:, -1] - (s[:, -3] + s[:, -4]) * 0.5 + 1e-12))


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations w_j after which APGD may halve its step (integer schedule of the authors' code)."""
    k, decrease, smallest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, w = [], 0
    while w + k <= steps:
        w += k
        out.append(w)
        k = max(k - decrease, smallest)
    return out


def apgd_start(x0: mx.array, eps: mx.array, lo: float, hi: float, norm: str, key: mx.array) -> mx.array:
    """A point on the eps-sphere (linf: cube surface) around x0, clipped; one draw for the batch."""
    shape = x0.shape[1:]
    if norm == "linf":
        t = mx.random.uniform(-1.0, 1.0, shape, key=key)
        t = t / mx.maximum(mx.max(mx.abs(t)), 1e-12)
    else:
        t = mx.random.normal(shape, key=key)
        t = t / mx.maximum(mx.sqrt(mx.sum(mx.square(t))), 1e-12)
    return mx.clip(x0 + _per_sample(eps, x0.ndim) * t, lo, hi)


def apgd_reference(
    forward: Callable[[mx.array], mx.array],
    x0: mx.array,
    y: mx.array,
    eps: mx.array,
    lo: float,
    hi: float,
    *,
    norm: str = "linf",
    loss: str = "ce",
    steps: int = 10,
    restarts: int = 1,
    n_target_classes: int = 0,
    y_target: mx.array | None = None,
    rho: float = 0.75,
    key: mx.array,
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """APGD as the obvious loop (Croce & Hein 2020, Algorithm 1); returns (x_adv, success, loss, logits).

    Per run (target class x restart): random start on the sphere, step size 2 eps, momentum 0.75,
    and at each checkpoint halve the step and go back to the best point when fewer than
    rho * interval steps increased the objective or when step and best objective did not change
    since the last checkpoint. Per sample: the first success, else the highest objective; samples
    misclassified at x keep x. No early stop and no EOT (a deterministic ``forward(x)``).
    """
    n, nd = x0.shape[0], x0.ndim
    y = y.astype(mx.int32)
    targeted = y_target is not None
    toward = targeted or n_target_classes > 0

    def objective_of(z, t):
        if loss == "ce":
            return objective(z, t, "ce", True) if toward else objective(z, y, "ce", False)
        return dlr_loss(z, y, t) if toward else dlr_loss(z, y)

    def success_of(z):
        pred = mx.argmax(z, axis=-1)
        return pred == y_target if targeted else pred != y

    def keep(best, cand):
        take = mx.logical_and(mx.logical_not(best[2]), mx.logical_or(cand[2], cand[1] > best[1]))
        return (
            mx.where(_per_sample(take, nd), cand[0], best[0]),
            mx.where(take, cand[1], best[1]),
            mx.logical_or(best[2], cand[2]),
            mx.where(take[:, None], cand[3], best[3]),
        )

    ckpt, prev = {}, 0
    for w in apgd_checkpoints(steps):
        ckpt[w - 1], prev = w - prev, w
    streams = mx.random.split(key, 3)
    n_runs = max(n_target_classes, 1) * restarts
    start_keys = mx.random.split(streams[0], n_runs)
    logits0 = forward(x0).astype(mx.float32)
    ranked = mx.argsort(logits0, axis=-1).astype(mx.int32) if n_target_classes else None
    c = logits0.shape[-1]

    def target_of(tc):
        if ranked is not None:
            return ranked[:, c - 2 - tc]
        return y_target.astype(mx.int32) if targeted else y

    clean_s = success_of(logits0)
    full = (x0, mx.where(clean_s, objective_of(logits0, target_of(0)), -mx.inf), clean_s, logits0)
    for run in range(n_runs):
        tgt = target_of(run // restarts)

        def total(xx, tgt=tgt):
            return mx.sum(objective_of(forward(xx).astype(mx.float32), tgt))

        grad_fn = mx.grad(total)

        def point(xx, tgt=tgt, grad_fn=grad_fn):
            z = forward(xx).astype(mx.float32)
            return objective_of(z, tgt), success_of(z), z, grad_fn(xx)

        x = apgd_start(x0, eps, lo, hi, norm, start_keys[run])
        f, s, z, g = point(x)
        eta = eps * 2.0
        x_prev, x_best, f_best, g_best, f_prev = x, x, f, g, f
        n_incr, f_best_last, reduced = mx.zeros((n,)), f, mx.ones((n,), mx.bool_)
        res = (x, f, s, z)
        for t in range(steps):
            a = 1.0 if t == 0 else 0.75
            zz = project(ascent_step(x, g, eta, norm), x0, eps, lo, hi, norm)
            xn = project(x + (a * (zz - x) + (1.0 - a) * (x - x_prev)), x0, eps, lo, hi, norm)
            f, s, z, gn = point(xn)
            res = keep(res, (xn, f, s, z))
            n_incr = n_incr + (f > f_prev).astype(mx.float32)
            improved = f > f_best
            x_best = mx.where(_per_sample(improved, nd), xn, x_best)
            g_best = mx.where(_per_sample(improved, nd), gn, g_best)
            f_best = mx.where(improved, f, f_best)
            x_prev, x, g, f_prev = x, xn, gn, f
            if t in ckpt:
                reduce = mx.logical_or(
                    n_incr < rho * ckpt[t], mx.logical_and(mx.logical_not(reduced), f_best_last >= f_best)
                )
                eta = mx.where(reduce, eta * 0.5, eta)
                x = mx.where(_per_sample(reduce, nd), x_best, x)
                g = mx.where(_per_sample(reduce, nd), g_best, g)
                reduced, f_best_last, n_incr = reduce, f_best, mx.zeros((n,))
            mx.eval(x, x_prev, g, eta, x_best, g_best, f_best, res)
        full = keep(full, res)
    mx.eval(full)
    return full[0], full[2], full[1], full[3]
