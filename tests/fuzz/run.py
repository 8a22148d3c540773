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
    before = [np.array(p) for _, p in mr._functional.tree_flatten(model.parameters())]

    def call():
        attack = getattr(mr, cls)(**kw)
        robust = mr.RobustModel(model, **robust_kw)
        return robust, attack, robust.attack(x, y, attack, key=key, batch_size=data.draw(st.sampled_from([None, 2])))

    out = _expect_ok_or_clear_error(call)
    after = [np.array(p) for _, p in mr._functional.tree_flatten(model.parameters())]
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
    before = [np.array(p) for _, p in mr._functional.tree_flatten(model.parameters())]
    out = _expect_ok_or_clear_error(lambda: robust.attack(x, y, getattr(mr, which)(**kw), key=mr.key(0)))
    after = [np.array(p) for _, p in mr._functional.tree_flatten(model.parameters())]
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
