"""Shared pieces of the oracles: per-sample broadcast, norms, objectives, projection, ascent step,
random start and per-row keys (the same semantics as the C++ core's geometry and scoring).
"""

from __future__ import annotations

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


def row_keys(key: mx.array, rows: mx.array) -> mx.array:
    """Reference of the core's per-row draw keys (N, 2): row i hashes (k0, k1 ^ rows[i]) through
    the PRNG, so its draw depends only on ``key`` and the sample's global index."""
    r = rows.astype(mx.uint32)
    mixed = mx.stack([mx.broadcast_to(key[0], r.shape), mx.bitwise_xor(key[1], r)], axis=-1)
    return mx.vmap(lambda k: mx.random.split(k, 1)[0])(mixed)
