"""Plain-MLX reference of the attack loop: the oracle the C++ core is tested against.

Same semantics as ``csrc/attack.cpp`` (random start, steps, best-so-far, restarts) written as the
obvious Python loop with ``mx.value_and_grad``; no compilation, no early stop, no C++.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx


def _per_sample(v: mx.array, ndim: int) -> mx.array:
    return v.reshape((v.shape[0],) + (1,) * (ndim - 1))


def _norm(d: mx.array, norm: str) -> mx.array:
    axes = tuple(range(1, d.ndim))
    if norm == "linf":
        return mx.max(mx.abs(d), axis=axes)
    return mx.sqrt(mx.sum(mx.square(d), axis=axes))


def objective(logits: mx.array, y: mx.array, loss: str, targeted: bool, probs=None) -> mx.array:
    """Per-sample objective to maximise (see ``csrc/attack.h``)."""
    z = logits.astype(mx.float32)
    if loss == "kl":
        log_q = z - mx.logsumexp(z, axis=-1, keepdims=True)
        plogp = mx.where(probs > 0, probs * mx.log(probs), 0.0)
        kl = mx.sum(plogp - probs * log_q, axis=-1)
        return -kl if targeted else kl
    zy = mx.take_along_axis(z, y[:, None], axis=-1)[:, 0]
    if loss == "ce":
        ce = mx.logsumexp(z, axis=-1) - zy
        return -ce if targeted else ce
    is_y = mx.arange(z.shape[-1])[None, :] == y[:, None]
    other = mx.max(mx.where(is_y, -mx.inf, z), axis=-1)
    return zy - other if targeted else other - zy


def project(x, x0, eps, lo, hi, norm):
    e = _per_sample(eps, x.ndim)
    delta = x - x0
    if norm == "linf":
        delta = mx.clip(delta, -e, e)
    else:
        dn = _per_sample(_norm(delta, "l2"), x.ndim)
        delta = delta * mx.minimum(e / mx.maximum(dn, 1e-12), 1.0)
    return mx.clip(x0 + delta, lo, hi)


def ascent_step(x, g, alpha, norm):
    a = _per_sample(alpha, x.ndim)
    if norm == "linf":
        return x + a * mx.sign(g)
    gn = _per_sample(_norm(g, "l2"), x.ndim)
    return x + a * (g / mx.maximum(gn, 1e-12))


def random_start(x0, eps, lo, hi, norm, key):
    shape = x0.shape[1:]
    if norm == "linf":
        delta = mx.random.uniform(-1.0, 1.0, shape, key=key)
    else:
        k1, k2 = mx.random.split(key)
        g = mx.random.normal(shape, key=k1)
        u = mx.random.uniform(0.0, 1.0, (), key=k2)
        delta = g / mx.maximum(mx.sqrt(mx.sum(mx.square(g))), 1e-12) * mx.power(u, 1.0 / g.size)
    return mx.clip(x0 + _per_sample(eps, x0.ndim) * delta, lo, hi)


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
    (EOT), with keys derived as in the C++ core.
    """
    n = x0.shape[0]
    y = y.astype(mx.int32)
    step_key = None

    def score(x):
        if eot_samples:
            draws = mx.random.split(step_key, max(eot_samples, 2))
            zs = [forward(x, draws[e]).astype(mx.float32) for e in range(eot_samples)]
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
            best = keep(best, cand) if (track_best and best[3] is not None) else cand
            x = project(ascent_step(x, g, step_size, norm), x0, eps, lo, hi, norm)
        step_key = step_keys[steps]
        obj, succ, logits = score(x)
        cand = (x, obj, succ, logits)
        best = keep(best, cand) if track_best else cand
        full = best if full is None or not track_best else keep(full, best)
    mx.eval(full)
    return full[0], full[2], full[1], full[3]
