"""Plain-MLX reference of the attack loop: the oracle the C++ core is tested against.

Same semantics as ``csrc/attack.cpp`` (random start, steps, first success within a restart, best
over restarts) written as the obvious Python loop with ``mx.value_and_grad``; no compilation, no early stop, no C++.
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


def row_keys(key: mx.array, rows: mx.array) -> mx.array:
    """Reference of the core's per-row draw keys (N, 2): row i hashes (k0, k1 ^ rows[i]) through
    the PRNG, so its draw depends only on ``key`` and the sample's global index."""
    r = rows.astype(mx.uint32)
    mixed = mx.stack([mx.broadcast_to(key[0], r.shape), mx.bitwise_xor(key[1], r)], axis=-1)
    return mx.vmap(lambda k: mx.random.split(k, 1)[0])(mixed)


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


# --- Square attack (Andriushchenko, Croce, Flammarion & Hein 2020) ---------------------------
# The official code's schedule and patterns (github.com/max-andr/square-attack) ported verbatim
# in NumPy, the loop written out per iteration in plain MLX with the C++ core's key derivation.

import numpy as np  # noqa: E402


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
