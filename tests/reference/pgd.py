"""PGD / FGSM (Madry et al. 2018, https://arxiv.org/abs/1706.06083): the attack loop as the obvious
Python loop with ``mx.value_and_grad`` (random start, steps, first success within a restart, best
over restarts); no compilation, no early stop, no C++.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx

from .common import _per_sample, ascent_step, objective, project, random_start, row_keys


def pgd_reference(
    forward: Callable[[mx.array], mx.array],
    x0: mx.array,
    y: mx.array,
    eps: mx.array,
    step_size: mx.array,
    lo: float,
    hi: float,
    *,
    norm: str = "linf",
    loss: str = "ce",
    steps: int = 10,
    restarts: int = 1,
    random_start_: bool = True,
    targeted: bool = False,
    track_best: bool = True,
    key: mx.array,
    eot_samples: int = 0,
    probs: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """Reference attack; returns (x_adv, success, loss, logits).

    ``eot_samples >= 1`` marks ``forward(x, key)`` as random: each score averages that many draws
    (EOT), with keys derived as in the C++ core (per-row keys (N, 2), see ``row_keys``).
    """
    n = x0.shape[0]
    y = y.astype(mx.int32)
    step_key = None
    rows = mx.arange(n, dtype=mx.uint32)

    def score(x):
        if eot_samples:
            draws = mx.random.split(step_key, max(eot_samples, 2))
            zs = [forward(x, row_keys(draws[e], rows)).astype(mx.float32) for e in range(eot_samples)]
            obj = sum(objective(z, y, loss, targeted, probs) for z in zs) * (1.0 / eot_samples)
            logits = sum(zs) * (1.0 / eot_samples)
        else:
            logits = forward(x).astype(mx.float32)
            obj = objective(logits, y, loss, targeted, probs)
        pred = mx.argmax(logits, axis=-1)
        succ = (pred == y) if targeted else (pred != y)
        return obj, succ, logits

    def keep(best, cand):
        bx, bl, bs, bz = best
        cx, cl, cs, cz = cand
        take = mx.logical_and(mx.logical_not(bs), mx.logical_or(cs, cl > bl))
        return (
            mx.where(_per_sample(take, x0.ndim), cx, bx),
            mx.where(take, cl, bl),
            mx.logical_or(bs, cs),
            mx.where(take[:, None], cz, bz),
        )

    def total(x):
        obj, succ, logits = score(x)
        return mx.sum(obj), (obj, succ, logits)

    def first_success(best, cand):
        # Within a restart: each sample's first successful iterate (x, logits).
        bx, bl, bs, bz = best
        cx, _, cs, cz = cand
        take = mx.logical_and(mx.logical_not(bs), cs)
        return (mx.where(_per_sample(take, x0.ndim), cx, bx), bl, mx.logical_or(bs, cs),
                mx.where(take[:, None], cz, bz))

    def finish_restart(best, last):
        # Samples that succeeded at some step keep that iterate (objective at its logits); the
        # others take the last iterate.
        bx, _, bs, bz = best
        lx, ll, ls, lz = last
        return (mx.where(_per_sample(bs, x0.ndim), bx, lx),
                mx.where(bs, objective(bz, y, loss, targeted, probs), ll),
                mx.logical_or(bs, ls), mx.where(bs[:, None], bz, lz))

    grad_fn = mx.value_and_grad(lambda x: total(x)[0])
    keys = mx.random.split(key, restarts)
    noise_keys = mx.random.split(mx.random.split(key)[1], restarts)
    full = None
    for r in range(restarts):
        x = random_start(x0, eps, lo, hi, norm, keys[r]) if random_start_ else x0
        step_keys = mx.random.split(noise_keys[r], steps + 1)
        best = (x, mx.full((n,), -mx.inf), mx.zeros((n,), mx.bool_), None)
        for t in range(steps):
            step_key = step_keys[t]
            obj, succ, logits = score(x)
            _, g = grad_fn(x)
            cand = (x, obj, succ, logits)
            if not track_best:
                best = cand
            else:
                if best[3] is None:
                    best = (x, best[1], best[2], mx.zeros_like(logits))
                best = first_success(best, cand)
            x = project(ascent_step(x, g, step_size, norm), x0, eps, lo, hi, norm)
        step_key = step_keys[steps]
        obj, succ, logits = score(x)
        cand = (x, obj, succ, logits)
        best = finish_restart(best, cand) if track_best else cand
        full = best if full is None or not track_best else keep(full, best)
    mx.eval(full)
    return full[0], full[2], full[1], full[3]


# --- Randomized smoothing (csrc/smoothing.h) --------------------------------------------------
