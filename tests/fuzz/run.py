"""Property-based fuzzing of mlx-robust's public functions and ``_core`` bindings.

Every call must either return a valid result or raise an ``Exception`` with a non-empty message;
a segfault or abort ends the process, which the caller (tests/test_fuzz.py, or you) sees as a
non-zero exit status. Run it in a subprocess:

    python tests/fuzz/run.py --examples 50                 # the short profile CI runs
    python tests/fuzz/run.py --examples 10000 --report fuzz.json   # the long run (hours on 2 CPUs)

Shapes are drawn from a small set so that MLX's compiled kernels are reused across cases; values,
dtypes, NaN/Inf, eps, step sizes, counts and callables vary freely.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

import warnings

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

import mlx_robust as mr
from mlx_robust import _core

BATCH = st.sampled_from([1, 1, 2, 3, 3, 5, 5, 0])
SAMPLE_SHAPES = [(8, 8, 1), (4,), (2, 3)]
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1.0, -1e-30, 1e30, float("nan"), float("inf"), -float("inf")]),
)
NUMBERS = st.one_of(FLOATS, st.integers(-5, 100), st.none(), st.booleans(), st.text(max_size=3))
DTYPES = st.sampled_from(["float32", "float16", "float64", "int32", "uint8", "bool", "bfloat16"])


class Linear(nn.Module):
    """A tiny classifier for any of SAMPLE_SHAPES (flattens, then one linear layer)."""

    def __init__(self, features: int, classes: int = 3):
        super().__init__()
        self.lin = nn.Linear(features, classes)

    def __call__(self, x):
        return self.lin(x.reshape(x.shape[0], -1))


MODELS = {s: Linear(int(np.prod(s))) for s in SAMPLE_SHAPES}


def _array(draw, shape, dtype: str, special: bool) -> Any:
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    a = rng.uniform(0.0, 1.0, size=shape)
    if draw(st.integers(0, 5)) == 0:
        a = rng.uniform(-0.5, 1.5, size=shape)  # partly out of bounds
    if special and a.size:
        idx = rng.integers(0, a.size, size=rng.integers(1, 4))
        a.flat[idx] = rng.choice([np.nan, np.inf, -np.inf, 7.0, -3.0], size=idx.size)
    as_numpy = draw(st.booleans())
    if dtype == "bfloat16":
        return mx.array(a.astype(np.float32)).astype(mx.bfloat16)
    np_a = a.astype(dtype) if dtype != "bool" else a > 0.5
    return np_a if as_numpy or dtype == "float64" else mx.array(np_a)


@st.composite
def batches(draw, allow_bad_shape: bool = True):
    shape = draw(st.sampled_from(SAMPLE_SHAPES))
    n = draw(BATCH)
    full = (n, *shape)
    if allow_bad_shape and draw(st.integers(0, 9)) == 0:
        full = draw(st.sampled_from([(n,), (n, 3, 3), (), (n, 8, 8, 2)]))
    dtype = draw(st.sampled_from(["float32"] * 12 + ["float16", "float64", "int32", "bool", "bfloat16"]))
    special = draw(st.integers(0, 6)) == 0
    return shape, _array(draw, full, dtype, special)


@st.composite
def labels(draw, n: int):
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(st.sampled_from([None, "abc", 3.5, [[1]]]))
    length = n if kind > 2 else draw(st.integers(0, 6))
    lo, hi = (-2, 4) if kind == 3 else (0, 2)
    vals = np.array(draw(st.lists(st.integers(lo, hi), min_size=length, max_size=length)), dtype=np.int64)
    if kind == 1:
        vals = vals.astype(np.float32)
    return vals if draw(st.booleans()) else mx.array(vals.astype(np.int32) if vals.dtype != np.float32 else vals)


def mostly(valid, invalid):
    """Valid nine times in ten, so the fuzz reaches the deep paths as well as the checks."""
    return st.integers(0, 9).flatmap(lambda i: invalid if i == 5 else valid)  # not 0: shrinks go there


@st.composite
def attack_configs(draw):
    cls = draw(st.sampled_from(["PGD", "PGD", "FGSM"]))
    kw = {}
    for name, strat in [
        ("eps", mostly(st.one_of(st.floats(0.0, 0.5, width=32), st.lists(st.floats(0.0, 0.5, width=32),
                                                                           min_size=1, max_size=5)),
                       st.one_of(FLOATS, st.lists(FLOATS, max_size=6)))),
        ("steps", mostly(st.integers(1, 6), st.one_of(st.integers(-2, 0), NUMBERS))),
        ("step_size", mostly(st.one_of(st.none(), st.floats(2**-10, 1.0, width=32)), FLOATS)),
        ("norm", mostly(st.sampled_from(["linf", "l2"]), st.sampled_from(["l1", 3, None]))),
        ("restarts", mostly(st.integers(1, 3), st.integers(-1, 0))),
        ("loss", mostly(st.sampled_from(["ce", "margin", "kl"]), st.sampled_from(["hinge", 0]))),
        ("unroll", mostly(st.one_of(st.none(), st.integers(1, 4)), st.integers(-1, 0))),
        ("random_start", st.booleans()),
        ("early_stop", st.booleans()),
        ("eot_samples", mostly(st.one_of(st.none(), st.integers(1, 3)), st.integers(-1, 0))),
    ]:
        if draw(st.booleans()):
            kw[name] = draw(strat)
    if cls == "FGSM":
        for k in ("steps", "restarts", "random_start"):
            kw.pop(k, None)
    return cls, kw


OUTCOMES: dict[str, int] = {}


def _expect_ok_or_clear_error(fn: Callable[[], Any]) -> Any:
    try:
        out = fn()
        OUTCOMES["ok"] = OUTCOMES.get("ok", 0) + 1
        return out
    except Exception as exc:  # the contract: any Python exception with a message, never a crash
        if not str(exc).strip():
            raise AssertionError(f"{type(exc).__name__} without a message") from exc
        OUTCOMES[type(exc).__name__] = OUTCOMES.get(type(exc).__name__, 0) + 1
        if os.environ.get("FUZZ_VERBOSE"):
            print(f"  {type(exc).__name__}: {str(exc)[:150]}")
        return exc


def fuzz_validate(data):
    shape, x = data.draw(batches())
    lo, hi = data.draw(st.sampled_from([(0.0, 1.0), (-1.0, 1.0), (1.0, 0.0), (float("nan"), 1.0)]))
    policy = data.draw(st.sampled_from(["raise", "clip", "ignore"]))
    out = _expect_ok_or_clear_error(lambda: mr.validate(x, bounds=(lo, hi), input_shape=shape, policy=policy))
    if not isinstance(out, Exception):
        xv, report = out
        a = np.array(xv.astype(mx.float32))
        assert np.isfinite(a).all() and a.min() >= lo - 1e-6 and a.max() <= hi + 1e-6


def fuzz_attack(data):
    shape, x = data.draw(batches())
    n = x.shape[0] if len(x.shape) else 0
    y = data.draw(labels(n))
    cls, kw = data.draw(attack_configs())
    model = MODELS[shape]
    robust_kw = dict(bounds=(0.0, 1.0), input_shape=shape, num_classes=3,
                     on_invalid=data.draw(st.sampled_from(["raise", "clip"])))
    if data.draw(st.integers(0, 5)) == 0:
        robust_kw["noise"] = mr.GaussianNoise(0.1, eot_samples=2)
    key = data.draw(mostly(st.sampled_from([mr.key(0), None, mx.zeros((2,), mx.uint32)]),
                           st.sampled_from(["k", mx.zeros((3,), mx.uint32)])))
    before = [np.array(p) for _, p in tree_flatten(model.parameters())]

    def call():
        attack = getattr(mr, cls)(**kw)
        robust = mr.RobustModel(model, **robust_kw)
        return robust, attack, robust.attack(x, y, attack, key=key, batch_size=data.draw(st.sampled_from([None, 2])))

    out = _expect_ok_or_clear_error(call)
    after = [np.array(p) for _, p in tree_flatten(model.parameters())]
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "the model was changed"
    if not isinstance(out, Exception):
        robust, attack, res = out
        xa = np.array(res.x_adv.astype(mx.float32))
        assert np.isfinite(xa).all() and xa.min() >= -1e-6 and xa.max() <= 1 + 1e-6
        eps = np.broadcast_to(np.asarray(attack.eps, dtype=np.float32), (xa.shape[0],))
        assert np.all(np.array(res.norms) <= eps * (1 + 1e-4) + 1e-5)


def fuzz_core_engine(data):
    n = data.draw(mostly(st.integers(1, 4), st.just(0)))
    x = mx.array(np.random.default_rng(n).uniform(0, 1, (n, 4)).astype(np.float32))
    if data.draw(st.integers(0, 9)) == 0:
        x = data.draw(batches())[1]
        x = x if isinstance(x, mx.array) else mx.array(np.asarray(x, dtype=np.float32))
    m = MODELS[(4,)]
    fn = mr._functional.ModelFunction(m)
    names, params = fn.flat_parameters()
    model_forward = fn._forward(names, params)
    outputs = data.draw(mostly(st.just("ok"), st.sampled_from(["raise", "none", "shape", "int", "nan"])))

    def forward(p, xx):
        if outputs == "raise":
            raise RuntimeError("model failed")
        if outputs == "none":
            return None
        if outputs == "shape":
            return xx
        if outputs == "int":
            return mx.zeros((xx.shape[0], 3), mx.int32)
        z = model_forward(p, xx)
        return z * float("nan") if outputs == "nan" else z

    m_args = dict(
        num_classes=data.draw(mostly(st.just(3), st.integers(-1, 4))),
        norm=data.draw(mostly(st.sampled_from(["linf", "l2"]), st.just("x"))),
        loss=data.draw(mostly(st.sampled_from(["ce", "margin", "kl"]), st.just("?"))),
        steps=data.draw(mostly(st.integers(1, 4), st.integers(-1, 0))),
        restarts=data.draw(mostly(st.integers(1, 2), st.integers(-1, 0))),
        random_start=data.draw(st.booleans()),
        targeted=data.draw(st.booleans()),
        track_best=data.draw(mostly(st.just(True), st.just(False))),
        early_stop=data.draw(st.booleans()),
        unroll=data.draw(mostly(st.integers(0, 3), st.just(-1))),
        stochastic=False,
        eot_samples=data.draw(mostly(st.integers(1, 2), st.integers(-1, 0))),
        key=mr.key(1),
    )
    if m_args["loss"] == "kl" or data.draw(st.integers(0, 9)) == 0:
        m_args["probs"] = mx.full((data.draw(mostly(st.just(n), st.integers(0, 5))), 3), 1 / 3)
    extra = data.draw(mostly(st.just(0), st.just(1)))
    y = mx.array(np.array(data.draw(st.lists(mostly(st.integers(0, 2), st.integers(-1, 3)), min_size=n + extra,
                                             max_size=n + extra)), dtype=np.int32))
    eps = mx.full((n + data.draw(mostly(st.just(0), st.just(1))),),
                  data.draw(mostly(st.floats(0, 0.5, width=32), FLOATS.filter(lambda v: v == v))))
    _expect_ok_or_clear_error(lambda: _core.AttackEngine().run(
        forward, params, x, y, eps, eps, mx.array(0.0), mx.array(1.0), **m_args))


def fuzz_core_helpers(data):
    shape, x = data.draw(batches(allow_bad_shape=True))
    x = x if isinstance(x, mx.array) else mx.array(np.asarray(x).astype(np.float32))
    n = x.shape[0] if x.ndim else 1
    eps = mx.full((data.draw(st.sampled_from([n, n + 1, 1])),), 0.1)
    norm = data.draw(st.sampled_from(["linf", "l2", "l0"]))
    which = data.draw(st.sampled_from(["project", "ascent_step", "random_start", "objective", "structure"]))
    calls = {
        "project": lambda: _core.project(x, x, eps, mx.array(0.0), mx.array(1.0), norm),
        "ascent_step": lambda: _core.ascent_step(x, x, eps, norm),
        "random_start": lambda: _core.random_start(x, eps, mx.array(0.0), mx.array(1.0), norm, mr.key(0)),
        "objective": lambda: _core.attack_objective(x.reshape(n, -1) if x.size else x, mx.zeros((n,), mx.int32),
                                                    data.draw(st.sampled_from(["ce", "margin", "kl"]))),
        "structure": lambda: _core.check_batch_structure(x, list(shape), "x"),
    }
    out = _expect_ok_or_clear_error(calls[which])
    if isinstance(out, mx.array):
        mx.eval(out)


def fuzz_loaders(data):
    payload = data.draw(st.binary(max_size=256))
    kind = data.draw(st.sampled_from(["npz", "idx", "npz-valid-zip", "npz-valid-zip", "npz-good"]))
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f")
        if kind == "npz-valid-zip":
            buf = io.BytesIO()
            arrays = {k: np.frombuffer(payload[: len(payload) // 4 * 4], dtype=np.float32)
                      for k in data.draw(st.lists(st.sampled_from(["x", "y", "z"]), max_size=3, unique=True))}
            np.savez(buf, **arrays)
            payload = buf.getvalue()
        if kind == "npz-good":
            n = data.draw(st.integers(0, 4))
            buf = io.BytesIO()
            xs = np.random.default_rng(n).uniform(0, 1, (n, 2, 2, 1)).astype(data.draw(st.sampled_from(["float32", "uint8", "float64"])))
            np.savez(buf, x=xs, y=np.array(data.draw(st.lists(st.integers(-1, 9), min_size=n, max_size=n)), dtype=np.int64))
            payload = buf.getvalue()
        with open(p, "wb") as f:
            f.write(payload)
        if kind == "idx":
            _expect_ok_or_clear_error(lambda: mr.datasets.load_mnist_idx(p, p))
        else:
            _expect_ok_or_clear_error(lambda: mr.datasets.load_npz(p))


def fuzz_evaluate(data):
    shape = (4,)
    n = data.draw(mostly(st.integers(1, 4), st.just(0)))
    x = mx.array(np.random.default_rng(n).uniform(0, 1, (n, 4)).astype(np.float32))
    y = data.draw(labels(n))
    attacks = data.draw(mostly(st.lists(st.sampled_from(["fgsm", "pgd", "pgd-margin"]), min_size=1, max_size=2,
                                        unique=True), st.lists(st.sampled_from(["fgsm", "nope", 3]), max_size=3)))
    eps = data.draw(mostly(st.lists(st.floats(0, 0.5, width=32), min_size=1, max_size=3),
                           st.lists(FLOATS, min_size=0, max_size=3)))
    robust = mr.RobustModel(MODELS[shape], input_shape=shape, num_classes=3)
    _expect_ok_or_clear_error(lambda: mr.evaluate(robust, x, y, attacks=attacks, eps=eps, key=mr.key(0),
                                                  progress=False, checks=data.draw(st.booleans())))


def fuzz_suite_attacks(data):
    shape, x = data.draw(batches())
    n = x.shape[0] if len(x.shape) else 0
    y = data.draw(labels(n))
    which = data.draw(st.sampled_from(["APGD", "APGDT", "CW", "Square"]))
    kw = {}
    common = [
        ("eps", mostly(st.floats(0.0, 0.5, width=32), FLOATS)),
        ("norm", mostly(st.sampled_from(["linf", "l2"]), st.just("l0"))),
    ]
    extra = {
        "APGD": [("steps", mostly(st.integers(1, 6), st.integers(-1, 0))),
                 ("loss", mostly(st.sampled_from(["ce", "dlr"]), st.just("x"))),
                 ("restarts", mostly(st.integers(1, 2), st.just(0)))],
        "APGDT": [("steps", mostly(st.integers(1, 6), st.integers(-1, 0))),
                  ("n_target_classes", mostly(st.integers(1, 2), st.integers(-1, 5)))],
        "CW": [("steps", mostly(st.integers(1, 5), st.integers(-1, 0))),
               ("binary_search_steps", mostly(st.integers(1, 2), st.integers(-1, 0))),
               ("kappa", mostly(st.floats(0, 2, width=32), FLOATS)),
               ("c", mostly(st.floats(2**-8, 10, width=32), FLOATS))],
        "Square": [("n_queries", mostly(st.integers(1, 20), st.integers(-1, 0))),
                   ("p_init", mostly(st.floats(0.0625, 1.0, width=32), FLOATS))],
    }[which]
    for name, strat in (common if which != "CW" else []) + extra:
        if data.draw(st.booleans()):
            kw[name] = data.draw(strat)
    model = MODELS[shape]
    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=shape, num_classes=3)
    before = [np.array(p) for _, p in tree_flatten(model.parameters())]
    out = _expect_ok_or_clear_error(lambda: robust.attack(x, y, getattr(mr, which)(**kw), key=mr.key(0)))
    after = [np.array(p) for _, p in tree_flatten(model.parameters())]
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "the model was changed"
    if not isinstance(out, Exception):
        xa = np.array(out.x_adv.astype(mx.float32))
        assert np.isfinite(xa).all() and xa.min() >= -1e-6 and xa.max() <= 1 + 1e-6


def fuzz_smoothing(data):
    shape, x = data.draw(batches())
    kw = dict(
        sigma=data.draw(mostly(st.floats(2**-6, 1.0, width=32), FLOATS)),
        n=data.draw(mostly(st.integers(1, 60), st.integers(-1, 0))),
        n0=data.draw(mostly(st.integers(1, 20), st.integers(-1, 0))),
        alpha=data.draw(mostly(st.floats(2**-10, 0.5, width=32), FLOATS)),
        batch_size=data.draw(mostly(st.integers(1, 64), st.integers(-1, 0))),
    )

    def call():
        import warnings as w

        with w.catch_warnings():
            w.simplefilter("ignore")  # "n too small to ever certify" is a warning by design
            robust = mr.RobustModel(MODELS[shape], bounds=(0.0, 1.0), input_shape=shape, num_classes=3,
                                    smoothing=mr.Smoothing(**kw))
            if data.draw(st.booleans()):
                return robust.certify(x, key=mr.key(0), progress=False)
            return robust.predict(x)

    out = _expect_ok_or_clear_error(call)
    if isinstance(out, tuple):
        cls, radius = out[0], out[1]
        c, r = np.array(cls), np.array(radius)
        assert np.all((c >= -1) & (c < 3)) and np.all(np.isfinite(r) | (c == -1))


def fuzz_stats(data):
    n = data.draw(st.one_of(st.integers(-3, 50), st.integers(0, 10**8)))
    k = data.draw(st.one_of(st.integers(-3, 60), st.integers(0, 10**8)))
    p = data.draw(FLOATS)
    fns = {
        "clopper_pearson_lower": lambda: _core.clopper_pearson_lower(k, n, p),
        "clopper_pearson_upper": lambda: _core.clopper_pearson_upper(k, n, p),
        "binomial_test_pvalue": lambda: _core.binomial_test_pvalue(k, n, p),
        "normal_ppf": lambda: _core.normal_ppf(p),
        "normal_cdf": lambda: _core.normal_cdf(p),
        "betainc": lambda: _core.betainc(abs(p) + 0.5 if p == p else p, float(max(n, 1)), data.draw(FLOATS)),
        "betaincinv": lambda: _core.betaincinv(float(max(k, 1)), float(max(n, 1)), p),
    }
    name = data.draw(st.sampled_from(sorted(fns)))
    out = _expect_ok_or_clear_error(fns[name])
    if isinstance(out, float) and name.startswith(("clopper", "binomial")):
        assert 0.0 <= out <= 1.0


def fuzz_training(data):
    shape = (4,)
    n = data.draw(mostly(st.integers(1, 4), st.just(0)))
    x = mx.array(np.random.default_rng(n).uniform(0, 1, (n, 4)).astype(np.float32))
    y = data.draw(labels(n))
    method = data.draw(mostly(st.sampled_from(["pgd-at", "trades", "mart", "fgsm-rs", "free", "noise", "mix"]),
                              st.sampled_from(["nope", 3])))
    kw = {}
    for name, strat in [("beta", mostly(st.floats(0, 10, width=32), FLOATS)),
                        ("clean_weight", mostly(st.floats(0, 1, width=32), FLOATS)),
                        ("sigma", mostly(st.floats(2**-6, 1, width=32), FLOATS)),
                        ("replays", mostly(st.integers(1, 4), st.integers(-1, 0)))]:
        if data.draw(st.integers(0, 3)) == 0:
            kw[name] = data.draw(strat)
    model = Linear(4)
    loss_fn = lambda m, a, b: nn.losses.cross_entropy(m(a), b, reduction="mean")  # noqa: E731
    attack = data.draw(mostly(st.just(mr.PGD(eps=0.1, steps=2)), st.sampled_from([None, "pgd"])))

    def call():
        lg = mr.adversarial_value_and_grad(model, loss_fn, attack=attack, method=method, **kw)
        return lg(model, x, y)

    out = _expect_ok_or_clear_error(call)
    if isinstance(out, tuple):
        assert np.isfinite(np.array(out[0]))


# --- engines and helpers called directly, the stochastic path, threads, re-entry, signals, mutable
# model state and oversized files (issue 12) --------------------------------------------------------

def _direct_inputs(data, n_extra_ok: bool = True):
    """x (n, 2, 2, 1), labels (maybe out of range), bounds (maybe lo > hi) and eps (maybe bad)."""
    n = data.draw(mostly(st.integers(1, 4), st.just(0)))
    x = mx.array(np.random.default_rng(n).uniform(0, 1, (n, 2, 2, 1)).astype(np.float32))
    extra = data.draw(mostly(st.just(0), st.just(1))) if n_extra_ok else 0
    y = mx.array(np.array(data.draw(st.lists(mostly(st.integers(0, 2), st.integers(-3, 5)), min_size=n + extra,
                                             max_size=n + extra)), dtype=np.int32))
    lo, hi = data.draw(mostly(st.just((0.0, 1.0)), st.sampled_from([(1.0, 0.0), (float("nan"), 1.0),
                                                                     (0.0, float("inf"))])))
    eps = mx.full((n,), data.draw(mostly(st.floats(0, 0.5, width=32), FLOATS)))
    return n, x, y, mx.array(lo), mx.array(hi), eps


def _direct_forward():
    fn = mr._functional.ModelFunction(MODELS[(4,)])
    names, params = fn.flat_parameters()
    model_forward = fn._forward(names, params)

    def forward(p, xx):
        return model_forward(p, xx.reshape(xx.shape[0], 4))

    return forward, params


def fuzz_core_apgd(data):
    n, x, y, lo, hi, eps = _direct_inputs(data)
    forward, params = _direct_forward()
    target = data.draw(st.sampled_from([None, "y", "bad"]))
    tgt = None if target is None else (y if target == "y" else mx.full((n,), 7, mx.int32))
    _expect_ok_or_clear_error(lambda: _core.ApgdEngine().run(
        forward, params, x, y, eps, lo, hi,
        num_classes=data.draw(mostly(st.just(3), st.integers(-1, 4))),
        norm=data.draw(mostly(st.sampled_from(["linf", "l2"]), st.just("l0"))),
        loss=data.draw(mostly(st.sampled_from(["ce", "dlr"]), st.just("x"))),
        steps=data.draw(mostly(st.integers(1, 5), st.integers(-1, 0))),
        restarts=data.draw(mostly(st.integers(1, 2), st.integers(-1, 0))),
        n_target_classes=data.draw(mostly(st.integers(0, 2), st.integers(-1, 5))),
        target=tgt, rho=data.draw(mostly(st.just(0.75), FLOATS)),
        early_stop=data.draw(st.booleans()), unroll=data.draw(mostly(st.integers(0, 3), st.just(-1))),
        stochastic=False, eot_samples=1, key=mr.key(0)))


def fuzz_core_cw(data):
    n, x, y, lo, hi, _ = _direct_inputs(data)
    forward, params = _direct_forward()
    _expect_ok_or_clear_error(lambda: _core.CwEngine().run(
        forward, params, x, y, lo, hi,
        num_classes=data.draw(mostly(st.just(3), st.integers(-1, 4))),
        targeted=data.draw(st.booleans()),
        c=data.draw(mostly(st.floats(2**-8, 10, width=32), FLOATS)),
        kappa=data.draw(mostly(st.floats(0, 2, width=32), FLOATS)),
        steps=data.draw(mostly(st.integers(1, 4), st.integers(-1, 0))),
        lr=data.draw(mostly(st.floats(2**-8, 0.125, width=32), FLOATS)),
        binary_search_steps=data.draw(mostly(st.integers(1, 2), st.integers(-1, 0))),
        early_abort=data.draw(st.booleans()), unroll=data.draw(mostly(st.integers(0, 3), st.just(-1))),
        stochastic=False, eot_samples=1, key=mr.key(0)))


def fuzz_core_square(data):
    n, x, y, lo, hi, eps = _direct_inputs(data)
    forward, params = _direct_forward()
    _expect_ok_or_clear_error(lambda: _core.SquareEngine().run(
        forward, params, x, y, eps, lo, hi,
        num_classes=data.draw(mostly(st.just(3), st.integers(-1, 4))),
        norm=data.draw(mostly(st.sampled_from(["linf", "l2"]), st.just("l0"))),
        loss=data.draw(mostly(st.sampled_from(["ce", "margin"]), st.just("x"))),
        n_queries=data.draw(mostly(st.integers(1, 12), st.integers(-1, 0))),
        p_init=data.draw(mostly(st.floats(0.0625, 1.0, width=32), FLOATS)),
        targeted=data.draw(st.booleans()), early_stop=data.draw(st.booleans()),
        unroll=data.draw(mostly(st.integers(0, 3), st.just(-1))), stochastic=False, key=mr.key(0)))


def fuzz_core_smoothing(data):
    n, x, _, _, _, _ = _direct_inputs(data, n_extra_ok=False)
    forward, params = _direct_forward()
    nan_model = data.draw(st.integers(0, 4)) == 0

    def fwd(p, xx):
        z = forward(p, xx)
        return mx.sqrt(z) if nan_model else z  # negative logits under noise: NaN draws

    nk = data.draw(mostly(st.just(n), st.integers(0, 5)))
    keys = mx.random.split(mr.key(0), max(nk, 1))[:nk]
    out = _expect_ok_or_clear_error(lambda: _core.SmoothingEngine().vote_counts(
        fwd, params, x, keys, n=data.draw(mostly(st.integers(1, 40), st.integers(-1, 0))),
        sigma=data.draw(mostly(st.floats(2**-6, 1.0, width=32), FLOATS)),
        batch_size=data.draw(mostly(st.integers(1, 32), st.integers(-1, 0))),
        num_classes=data.draw(mostly(st.just(3), st.integers(-1, 4))), overlap=data.draw(st.booleans())))
    counts = out[0] if isinstance(out, tuple) else out
    if isinstance(counts, mx.array):
        c = np.array(counts)
        assert (c >= 0).all(), "negative vote counts"


def fuzz_loss_helpers(data):
    n = data.draw(st.integers(0, 4))
    c = data.draw(mostly(st.integers(2, 4), st.integers(0, 1)))
    logits = mx.array(np.random.default_rng(n).normal(size=(n, c)).astype(np.float32))
    if data.draw(st.integers(0, 5)) == 0:
        logits = logits * float("nan")
    extra = data.draw(mostly(st.just(0), st.integers(-1, 1)))
    y = mx.array(np.array(data.draw(st.lists(mostly(st.integers(0, max(c - 1, 0)), st.integers(-5, 9)),
                                             min_size=max(n + extra, 0), max_size=max(n + extra, 0))),
                          dtype=np.int32))
    which = data.draw(st.sampled_from(["dlr", "dlr-t", "cw", "objective"]))
    calls = {
        "dlr": lambda: _core.dlr_loss(logits, y),
        "dlr-t": lambda: _core.dlr_loss(logits, y, y),
        "cw": lambda: _core.cw_margin_loss(logits, y, data.draw(mostly(st.just(0.0), FLOATS)),
                                           data.draw(st.booleans())),
        "objective": lambda: _core.attack_objective(logits, y, data.draw(st.sampled_from(["ce", "margin"]))),
    }
    out = _expect_ok_or_clear_error(calls[which])
    if isinstance(out, mx.array):
        mx.eval(out)


def fuzz_stochastic(data):
    """A random defence: the same key gives the same result whatever the batching and early stop."""
    n = data.draw(st.integers(1, 5))
    x = mx.array(np.random.default_rng(n).uniform(0, 1, (n, 4)).astype(np.float32))
    y = mx.array(np.arange(n, dtype=np.int32) % 3)
    robust = mr.RobustModel(MODELS[(4,)], input_shape=(4,), num_classes=3,
                            noise=mr.GaussianNoise(data.draw(st.sampled_from([0.05, 0.3])), eot_samples=2))
    attack = data.draw(st.sampled_from([mr.PGD(eps=0.1, steps=3), mr.PGD(eps=0.3, steps=2, early_stop=False),
                                        mr.APGD(eps=0.1, steps=3), mr.FGSM(eps=0.2)]))
    seed = data.draw(st.integers(0, 3))
    out = _expect_ok_or_clear_error(lambda: [robust.attack(x, y, attack, key=mr.key(seed), batch_size=b)
                                             for b in (None, data.draw(st.integers(1, 3)))])
    if not isinstance(out, Exception):
        a, b = out
        assert np.array_equal(np.array(a.x_adv), np.array(b.x_adv)), "x_adv depends on batch_size"
        assert np.array_equal(np.array(a.success), np.array(b.success)), "success depends on batch_size"


def _with_timeout(fn: Callable[[], Any], seconds: float = 60.0) -> Any:
    """Run fn in a thread; a hang (deadlock) fails the contract instead of stalling the fuzz."""
    import threading

    box: dict[str, Any] = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            box["exc"] = exc
        finally:
            mx.clear_streams()  # MLX 0.32: a thread must destroy its streams, or the process aborts at exit

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise AssertionError(f"hung for more than {seconds} s")
    if "exc" in box:
        raise box["exc"]
    return box.get("out")


class _Reentrant(nn.Module):
    """A model whose forward calls back into mlx-robust."""

    def __init__(self, how: str, other: Any):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.how = how
        self.other = other

    def __call__(self, x):
        if self.how == "validate":
            mr.validate(x, bounds=(-10.0, 10.0), input_shape=(4,))
        elif self.how == "predict":
            self.other.predict(x)
        elif self.how == "attack":
            self.other.attack(x, mx.zeros((x.shape[0],), mx.int32), mr.FGSM(eps=0.1), key=mr.key(0))
        return self.lin(x)


def fuzz_reentrancy(data):
    n = data.draw(st.integers(1, 3))
    x = mx.array(np.random.default_rng(n).uniform(0, 1, (n, 4)).astype(np.float32))
    other = mr.RobustModel(MODELS[(4,)], input_shape=(4,), num_classes=3)
    how = data.draw(st.sampled_from(["validate", "predict", "attack"]))
    smoothing = mr.Smoothing(0.25, n=64, n0=16, alpha=0.1, batch_size=32) if data.draw(st.booleans()) else None
    robust = mr.RobustModel(_Reentrant(how, other), input_shape=(4,), num_classes=3, smoothing=smoothing)
    which = data.draw(st.sampled_from(["pgd", "apgd", "certify", "predict"]))
    calls = {
        "pgd": lambda: robust.attack(x, None, mr.PGD(eps=0.1, steps=2), key=mr.key(0)),
        "apgd": lambda: robust.attack(x, None, mr.APGD(eps=0.1, steps=2), key=mr.key(0)),
        "certify": lambda: robust.certify(x, sigma=0.25, n0=16, n=64, alpha=0.1, key=mr.key(0), progress=False),
        "predict": lambda: robust.predict(x),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "n too small to ever certify" is a warning by design
        _expect_ok_or_clear_error(lambda: _with_timeout(calls[which]))
    # The core is usable afterwards (no lock left held).
    _with_timeout(lambda: other.attack(x, None, mr.FGSM(eps=0.1), key=mr.key(0)))


def fuzz_threads(data):
    """Attacks and certifications in worker threads while another thread serves the same model."""
    import threading

    model = MODELS[(4,)]
    n = data.draw(st.integers(1, 4))
    x = mx.array(np.random.default_rng(data.draw(st.integers(0, 2**16))).uniform(0, 1, (n, 4)).astype(np.float32))
    expected = np.array(model(x))
    robust = mr.RobustModel(model, input_shape=(4,), num_classes=3)
    work = data.draw(st.sampled_from(["attack", "certify", "apgd"]))
    errors: list[str] = []
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                if not np.array_equal(np.array(model(x)), expected):
                    errors.append("served logits changed")
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{type(exc).__name__}: {exc}")
        mx.clear_streams()

    def job():
        if work == "attack":
            return robust.attack(x, None, mr.PGD(eps=0.1, steps=3), key=mr.key(0))
        if work == "apgd":
            return robust.attack(x, None, mr.APGD(eps=0.1, steps=3), key=mr.key(0))
        return robust.certify(x, sigma=0.25, n0=16, n=64, alpha=0.1, key=mr.key(0), progress=False)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        _expect_ok_or_clear_error(lambda: _with_timeout(job))
    finally:
        stop.set()
        server.join(10)
    assert not errors, errors[:3]


class _Interrupt(Exception):
    pass


def fuzz_signals(data):
    """A signal handler's exception interrupts a long attack; the model and the next call are fine."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return
    model = MODELS[(4,)]
    robust = mr.RobustModel(model, input_shape=(4,), num_classes=3)
    x = mx.array(np.random.default_rng(data.draw(st.integers(0, 2**16))).uniform(0, 1, (8, 4)).astype(np.float32))
    before = [np.array(p) for _, p in tree_flatten(model.parameters())]
    attack = data.draw(st.sampled_from([mr.PGD(eps=0.1, steps=200_000, early_stop=False),
                                        mr.APGD(eps=0.1, steps=200_000, early_stop=False)]))

    def handler(signum, frame):
        raise _Interrupt("interrupted")

    old = signal.signal(signal.SIGALRM, handler)
    t0 = time.perf_counter()
    try:
        signal.setitimer(signal.ITIMER_REAL, data.draw(st.sampled_from([0.05, 0.2, 0.5])))
        try:
            robust.attack(x, None, attack, key=mr.key(0))
        except _Interrupt:
            OUTCOMES["ok"] = OUTCOMES.get("ok", 0) + 1  # interrupted, as it must be
        else:
            raise AssertionError("a 200,000-step attack finished before the signal")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - t0 < 10, "the signal was not honoured in time"
    after = [np.array(p) for _, p in tree_flatten(model.parameters())]
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "the model was changed"
    robust.attack(x, None, mr.PGD(eps=0.1, steps=2), key=mr.key(0))  # the next call works


class _Mutable(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = 1.0
        self._bias = mx.zeros((3,))
        self.act = nn.ReLU()

    def __call__(self, x):
        return self.lin(self.act(x)) * self.scale + self._bias


def fuzz_mutable_state(data):
    """Changing non-parameter state between calls: the same result as a fresh RobustModel."""
    mx.random.seed(0)
    model = _Mutable()
    x = mx.array(np.random.default_rng(data.draw(st.integers(0, 2**16))).uniform(0, 1, (3, 4)).astype(np.float32))
    y = mx.array(np.array([0, 1, 2], dtype=np.int32))
    robust = mr.RobustModel(model, input_shape=(4,), num_classes=3)
    attack = data.draw(st.sampled_from([mr.PGD(eps=0.2, steps=3), mr.APGD(eps=0.2, steps=3)]))
    robust.attack(x, y, attack, key=mr.key(0))
    change = data.draw(st.sampled_from(["scale", "bias", "act"]))
    if change == "scale":
        model.scale = data.draw(st.sampled_from([-1.0, 0.0, 3.0]))
    elif change == "bias":
        model._bias = mx.array([5.0, -5.0, 0.0])
    else:
        model.act = data.draw(st.sampled_from([nn.Sigmoid(), nn.Tanh(), nn.Identity()]))
    got = robust.attack(x, y, attack, key=mr.key(0))
    fresh_robust = mr.RobustModel(model, input_shape=(4,), num_classes=3)
    fresh = fresh_robust.attack(x, y, attack, key=mr.key(0))
    assert np.allclose(np.array(got.logits), np.array(fresh.logits), atol=1e-5), f"stale graph after {change}"
    assert np.array_equal(np.array(got.success), np.array(fresh.success)), f"stale graph after {change}"
    assert np.array_equal(np.array(robust.predict(x)), np.array(fresh_robust.predict(x))), f"stale predict after {change}"
    OUTCOMES["ok"] = OUTCOMES.get("ok", 0) + 1


def fuzz_oversized_files(data):
    """Compressed and header-declared sizes far beyond the payload: a ValueError, quickly, in bounded memory."""
    import gzip
    import struct
    import zipfile

    kind = data.draw(st.sampled_from(["idx-gz-bomb", "idx-header", "npz-header", "npz-bomb"]))
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "f.gz" if kind.startswith("idx") else "f.npz")
        big = data.draw(st.sampled_from([2**20, 2**31, 2**32 - 1] if kind.startswith("idx") else [2**20, 2**31, 2**40]))
        if kind == "idx-gz-bomb":
            with gzip.open(p, "wb", compresslevel=9) as f:
                f.write(struct.pack(">IIII", 0x803, 60000, 28, 28))
                chunk = bytes(2**20)
                for _ in range(data.draw(st.integers(1, 64))):
                    f.write(chunk)
        elif kind == "idx-header":
            with gzip.open(p, "wb") as f:
                f.write(struct.pack(">IIII", 0x803, big, 28, 28) + bytes(data.draw(st.integers(0, 64))))
        else:
            header = {"descr": "<f4", "fortran_order": False, "shape": (big, 4)}
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, header)
            if kind == "npz-bomb":
                buf.write(bytes(min(big * 16, data.draw(st.sampled_from([2**16, 2**24])))))
            with zipfile.ZipFile(p, "w", compression=zipfile.ZIP_DEFLATED) as z:
                z.writestr("x.npy", buf.getvalue())
                z.writestr("y.npy", b"")
        t0 = time.perf_counter()
        if kind.startswith("idx"):
            out = _expect_ok_or_clear_error(lambda: mr.datasets.load_mnist_idx(p, p, max_bytes=2**24))
        else:
            out = _expect_ok_or_clear_error(lambda: mr.datasets.load_npz(p, max_bytes=2**24))
        assert isinstance(out, ValueError), f"expected a ValueError, got {out!r}"
        assert os.path.basename(p) in str(out), f"the error does not name the file: {out}"
        assert time.perf_counter() - t0 < 20, "refusing took too long"
        OUTCOMES["ok"] = OUTCOMES.get("ok", 0) + 1  # refused as it must be


TARGETS = {
    "validate": fuzz_validate,
    "attack": fuzz_attack,
    "core_engine": fuzz_core_engine,
    "core_helpers": fuzz_core_helpers,
    "loaders": fuzz_loaders,
    "evaluate": fuzz_evaluate,
    "suite_attacks": fuzz_suite_attacks,
    "smoothing": fuzz_smoothing,
    "stats": fuzz_stats,
    "training": fuzz_training,
    "core_apgd": fuzz_core_apgd,
    "core_cw": fuzz_core_cw,
    "core_square": fuzz_core_square,
    "core_smoothing": fuzz_core_smoothing,
    "loss_helpers": fuzz_loss_helpers,
    "stochastic": fuzz_stochastic,
    "reentrancy": fuzz_reentrancy,
    "threads": fuzz_threads,
    "signals": fuzz_signals,
    "mutable_state": fuzz_mutable_state,
    "oversized_files": fuzz_oversized_files,
}


def main() -> int:
    warnings.simplefilter("ignore", RuntimeWarning)  # NaN/Inf casts are the point of the fuzz
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=50, help="cases per function")
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(TARGETS))
    parser.add_argument("--report", default=None, help="write a JSON summary here")
    args = parser.parse_args()
    summary = {}
    failed = False
    for name, target in TARGETS.items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        OUTCOMES.clear()
        test = settings(max_examples=args.examples, deadline=None, database=None, derandomize=True,
                        suppress_health_check=list(HealthCheck))(given(st.data())(target))
        try:
            test()
            status = "ok"
        except Exception:  # a broken contract (not a crash): report it and fail
            status = "FAILED\n" + traceback.format_exc()
            failed = True
        summary[name] = {"examples": args.examples, "seconds": round(time.perf_counter() - t0, 1),
                         "status": status.splitlines()[0], "outcomes": dict(OUTCOMES)}
        print(f"{name:14s} {args.examples:6d} cases {summary[name]['seconds']:8.1f} s  {status}  "
              f"{dict(sorted(OUTCOMES.items()))}", flush=True)
    if args.report:
        with open(args.report, "w") as f:
            json.dump(summary, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
