"""Bad inputs: every one gets a clear ValueError/TypeError naming the argument, never a crash,
and the wrapped model is left exactly as it was."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_robust as mr
from mlx_robust import _core
from conftest import assert_unchanged, snapshot

SHAPE = (8, 8, 1)
NAN = float("nan")
INF = float("inf")


def make_robust(model, **kw):
    kw.setdefault("bounds", (0.0, 1.0))
    kw.setdefault("input_shape", SHAPE)
    kw.setdefault("num_classes", 10)
    return mr.RobustModel(model, **kw)


@pytest.fixture
def robust(mlp):
    return make_robust(mlp)


def raises_untouched(model, exc, match, fn):
    """fn() raises exc matching `match`, and the model is unchanged afterwards."""
    snap = snapshot(model)
    with pytest.raises(exc, match=match) as info:
        fn()
    assert_unchanged(model, snap)
    return info


def with_value(x: mx.array, sample: int, value: float) -> mx.array:
    """x with one element of one sample replaced by `value` (numpy copy, so x itself is untouched)."""
    a = np.array(x)
    a[sample, 3, 5, 0] = value
    return mx.array(a)


# --------------------------------------------------------------------------
# Bad batches through every public entry point

ENTRY_POINTS = {
    "call": lambda r, x: r(x),
    "predict": lambda r, x: r.predict(x),
    "attack_pgd": lambda r, x: r.attack(x, None, mr.PGD(eps=0.1, steps=2), key=mr.key(0)),
    "attack_fgsm": lambda r, x: r.attack(x, None, mr.FGSM(eps=0.1), key=mr.key(0)),
}

X_NAME = r"^(\[validate\] )?x\b"  # every message starts by naming the argument

BAD_X = {
    "nan": (
        lambda x: with_value(x, 5, NAN),
        ValueError,
        r"^x contains 1 NaN/Inf value\(s\) in 1 sample\(s\); first offending samples: \[5\]",
    ),
    "+inf": (
        lambda x: with_value(x, 3, INF),
        ValueError,
        r"^x contains 1 NaN/Inf value\(s\) in 1 sample\(s\); first offending samples: \[3\]",
    ),
    "-inf": (
        lambda x: with_value(x, 63, -INF),
        ValueError,
        r"^x contains 1 NaN/Inf value\(s\) in 1 sample\(s\); first offending samples: \[63\]",
    ),
    "nan_and_inf_two_samples": (
        lambda x: with_value(with_value(x, 9, INF), 2, NAN),
        ValueError,
        r"^x contains 2 NaN/Inf value\(s\) in 2 sample\(s\); first offending samples: \[2, 9\]",
    ),
    "rank1": (lambda x: x.reshape(-1)[:64], ValueError, X_NAME + r".*rank >= 2.*got shape \(64,\)"),
    "no_batch_axis": (
        lambda x: x[0],
        ValueError,
        X_NAME + r" has shape \(8, 8, 1\) but the model expects \(N, 8, 8, 1\)",
    ),
    "flat_samples": (lambda x: x.reshape(64, 64), ValueError, X_NAME + r" has shape \(64, 64\)"),
    "wrong_channels": (
        lambda x: mx.concatenate([x, x, x], axis=-1),
        ValueError,
        X_NAME + r" has shape \(64, 8, 8, 3\) but the model expects \(N, 8, 8, 1\)",
    ),
    "empty_batch": (lambda x: x[:0], ValueError, X_NAME + r" is an empty batch \(N = 0\)"),
    "above_bounds": (
        lambda x: with_value(x, 4, 1.5),
        ValueError,
        r"^x has 1 value\(s\) outside the bounds \[0\.0, 1\.0\] in 1 sample\(s\); first offending samples: \[4\]",
    ),
    "below_bounds": (
        lambda x: with_value(with_value(x, 12, -0.25), 1, -3.0),
        ValueError,
        r"^x has 2 value\(s\) outside the bounds .* first offending samples: \[1, 12\]",
    ),
    "mx_int32": (lambda x: (x * 16).astype(mx.int32), TypeError, X_NAME + r" must be floating point.*int32"),
    "mx_uint8": (lambda x: (x * 16).astype(mx.uint8), TypeError, X_NAME + r" must be floating point.*uint8"),
    "np_int64": (lambda x: np.array(x * 16).astype(np.int64), TypeError, X_NAME + r" must be floating point.*int64"),
    "np_bool": (lambda x: np.array(x) > 0.5, TypeError, X_NAME + r" must be floating point.*bool"),
    "np_complex": (lambda x: np.array(x).astype(np.complex64), TypeError, X_NAME + r" must be floating point"),
    "none": (lambda x: None, TypeError, X_NAME + r" must be a numeric array"),
    "string": (lambda x: "an image", TypeError, X_NAME + r" must be a numeric array"),
    "ragged_list": (lambda x: [[0.1, 0.2], [0.3]], TypeError, X_NAME + r" must be an mx.array or a numpy array"),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(BAD_X))
def test_bad_batch_raises_and_model_untouched(mlp, batch, robust, entry, case):
    build, exc, match = BAD_X[case]
    x = batch[0]
    x_before = mx.array(x)
    bad = build(x)
    raises_untouched(mlp, exc, match, lambda: ENTRY_POINTS[entry](robust, bad))
    assert mx.array_equal(x, x_before)  # the caller's batch is not modified either


@pytest.mark.parametrize("case", ["nan", "+inf", "-inf"])
def test_nonfinite_raises_even_with_clip_policy(mlp, batch, case):
    build, exc, match = BAD_X[case]
    robust = make_robust(mlp, on_invalid="clip")
    for entry in ENTRY_POINTS.values():
        raises_untouched(mlp, exc, match, lambda: entry(robust, build(batch[0])))


def test_numpy_float64_is_accepted_and_converted(mlp, batch, robust):
    x, y = batch
    x64 = np.array(x).astype(np.float64)
    snap = snapshot(mlp)
    logits = robust(x64)
    assert logits.dtype == mx.float32 and logits.shape == (64, 10)
    np.testing.assert_allclose(np.array(logits), np.array(mlp(x)), rtol=1e-6, atol=1e-6)
    assert mx.array_equal(robust.predict(x64), mx.argmax(mlp(x), axis=-1).astype(mx.int32))
    res = robust.attack(x64, np.array(y).astype(np.int64), mr.PGD(eps=0.1, steps=2), key=mr.key(0))
    assert res.x_adv.dtype == mx.float32 and res.x_adv.shape == (64, *SHAPE)
    assert float(mx.max(res.norms).item()) <= 0.1 + 1e-6
    xv, _ = robust.validate(x64)
    assert xv.dtype == mx.float32
    assert_unchanged(mlp, snap)


def test_clip_policy_clips_and_works(mlp, batch):
    x, y = batch
    a = np.array(x)
    a[0] += 0.7  # many values above 1
    a[5] -= 0.6  # many values below 0
    assert (a > 1).any() and (a < 0).any()
    robust = make_robust(mlp, on_invalid="clip")
    strict = make_robust(mlp)
    snap = snapshot(mlp)
    with pytest.raises(ValueError, match=r"^x has \d+ value\(s\) outside the bounds.*\[0, 5\]"):
        strict(a)
    clipped = np.clip(a, 0.0, 1.0)
    np.testing.assert_array_equal(np.array(robust(a)), np.array(mlp(mx.array(clipped))))
    np.testing.assert_array_equal(np.array(robust.predict(a)), np.array(strict.predict(clipped)))
    res = robust.attack(a, y, mr.PGD(eps=0.1, steps=3), key=mr.key(1))
    xa = np.array(res.x_adv)
    assert xa.min() >= 0.0 and xa.max() <= 1.0
    # the ball is around the clipped batch, not the raw one
    assert np.abs(xa - clipped).max() <= 0.1 + 1e-6
    assert_unchanged(mlp, snap)


# --------------------------------------------------------------------------
# Labels and targets


def _labels(y, kind):
    yn = np.array(y)
    return {
        "short": yn[:3],
        "long": np.concatenate([yn, yn[:1]]),
        "too_big": np.where(np.arange(64) == 4, 10, yn),
        "negative": np.where(np.arange(64) == 7, -1, yn),
        "float": yn.astype(np.float32),
        "mx_float": mx.array(yn.astype(np.float32)),
        "column": yn[:, None],
        "scalar": np.int64(3),
    }[kind]


LABEL_CASES = [
    ("short", ValueError, r"has 3 labels but x has 64 samples"),
    ("long", ValueError, r"has 65 labels but x has 64 samples"),
    ("too_big", ValueError, r"has labels outside \[0, 10\) at samples \[4\]"),
    ("negative", ValueError, r"has labels outside \[0, 10\) at samples \[7\]"),
    ("float", TypeError, r"must hold integer class labels, got dtype float32"),
    ("mx_float", TypeError, r"must hold integer class labels"),
    ("column", ValueError, r"must have shape \(N,\), got shape \(64, 1\)"),
    ("scalar", ValueError, r"must have shape \(N,\)"),
]


@pytest.mark.parametrize("attack", [mr.PGD(eps=0.1, steps=2), mr.FGSM(eps=0.1)], ids=["pgd", "fgsm"])
@pytest.mark.parametrize("kind,exc,msg", LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_bad_labels(mlp, batch, robust, attack, kind, exc, msg):
    x, y = batch
    raises_untouched(mlp, exc, r"^y " + msg, lambda: robust.attack(x, _labels(y, kind), attack, key=mr.key(0)))


@pytest.mark.parametrize("kind,exc,msg", LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_bad_targets(mlp, batch, robust, kind, exc, msg):
    x, y = batch
    targets = _labels((np.array(y) + 1) % 10, kind)
    raises_untouched(
        mlp, exc, r"^y_target " + msg,
        lambda: robust.attack(x, y, mr.PGD(eps=0.1, steps=2), y_target=targets, key=mr.key(0)),
    )


# --------------------------------------------------------------------------
# Attack configurations

BAD_CONFIGS = [
    (dict(eps=-0.1), r"^eps must be a finite number >= 0, got -0.1"),
    (dict(eps=NAN), r"^eps must be a finite number >= 0, got nan"),
    (dict(eps=INF), r"^eps must be a finite number >= 0, got inf"),
    (dict(eps=-INF), r"^eps must be a finite number >= 0"),
    (dict(eps=[0.1, NAN]), r"^eps must be finite and >= 0 for every sample"),
    (dict(eps=[0.1, -0.1]), r"^eps must be finite and >= 0 for every sample"),
    (dict(eps=[[0.1, 0.2]]), r"^eps must be a number or a per-sample vector of shape \(N,\)"),
    (dict(steps=0), r"^steps must be an integer >= 1, got 0"),
    (dict(steps=-1), r"^steps must be an integer >= 1, got -1"),
    (dict(steps=1.5), r"^steps must be an integer >= 1, got 1.5"),
    (dict(steps="3"), r"^steps must be an integer >= 1"),
    (dict(steps=True), r"^steps must be an integer >= 1"),
    (dict(step_size=0.0), r"^step_size must be a finite number > 0"),
    (dict(step_size=-0.01), r"^step_size must be a finite number > 0"),
    (dict(step_size=NAN), r"^step_size must be a finite number > 0"),
    (dict(step_size=INF), r"^step_size must be a finite number > 0"),
    (dict(step_size=[0.01, 0.0]), r"^step_size must be > 0"),
    (dict(norm="l1"), r"^norm must be one of \('linf', 'l2'\), got 'l1'"),
    (dict(norm="L7"), r"^norm must be one of"),
    (dict(loss="hinge"), r"^loss must be one of \('ce', 'margin', 'kl'\), got 'hinge'"),
    (dict(restarts=0), r"^restarts must be an integer >= 1, got 0"),
    (dict(restarts=-2), r"^restarts must be an integer >= 1"),
    (dict(restarts=1.5), r"^restarts must be an integer >= 1"),
    (dict(unroll=0), r"^unroll must be None or an integer >= 1, got 0"),
    (dict(unroll=-3), r"^unroll must be None or an integer >= 1"),
    (dict(unroll=2.0), r"^unroll must be None or an integer >= 1"),
]


@pytest.mark.parametrize("kwargs,match", BAD_CONFIGS, ids=[next(iter(c[0])) + "=" + repr(next(iter(c[0].values()))) for c in BAD_CONFIGS])
@pytest.mark.parametrize("cls", [mr.PGD, mr.FGSM])
def test_bad_attack_config(cls, kwargs, match):
    # FGSM runs PGD's checks first, so it reports the same messages.
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(
    "kwargs", [dict(steps=2), dict(restarts=2), dict(random_start=True)], ids=["steps", "restarts", "random_start"]
)
def test_fgsm_rejects_multi_step_settings(kwargs):
    with pytest.raises(ValueError, match=r"FGSM is a single step from x: use PGD for steps, restarts or random starts"):
        mr.FGSM(**kwargs)


@pytest.mark.parametrize("field", ["eps", "step_size"])
@pytest.mark.parametrize("length", [1, 3, 65])
@pytest.mark.parametrize("batch_size", [None, 16])
def test_per_sample_vector_of_wrong_length(mlp, batch, robust, field, length, batch_size):
    x, y = batch
    kwargs = dict(eps=0.1, steps=2)
    kwargs[field] = [0.05] * length
    attack = mr.PGD(**kwargs)
    raises_untouched(
        mlp, ValueError, rf"^{field} must be a number or have shape \(64,\) \(one per sample\), got shape \({length},\)",
        lambda: robust.attack(x, y, attack, key=mr.key(0), batch_size=batch_size),
    )


def test_per_sample_eps_of_right_length_is_respected(mlp, batch, robust):
    x, y = batch
    eps = np.linspace(0.0, 0.2, 64).astype(np.float32)
    res = robust.attack(x, y, mr.PGD(eps=eps, steps=3), key=mr.key(2), batch_size=24)
    norms = np.array(res.norms)
    assert np.all(norms <= eps + 1e-6)
    assert norms[0] == 0.0  # eps = 0 leaves the sample as it was
    np.testing.assert_array_equal(np.array(res.x_adv)[0], np.array(x)[0])


@pytest.mark.parametrize("eps", [np.float32(0.1), mx.array(0.1)], ids=["np.float32", "mx_scalar"])
def test_scalar_eps_of_numpy_or_mlx_type_is_accepted(mlp, batch, robust, eps):
    x, y = batch
    res = robust.attack(x, y, mr.PGD(eps=eps, steps=2), key=mr.key(0))
    assert float(mx.max(res.norms).item()) <= 0.1 + 1e-6


def test_attack_must_be_a_configuration(mlp, batch, robust):
    x, y = batch
    raises_untouched(mlp, TypeError, r"^attack must be an attack configuration.*got str",
                     lambda: robust.attack(x, y, "pgd"))
    raises_untouched(mlp, TypeError, r"^attack must be an attack configuration.*got dict",
                     lambda: robust.attack(x, y, {"eps": 0.1}))


@pytest.mark.parametrize(
    "key,exc",
    [(3, TypeError), ("seed", TypeError), (np.array([0, 1], dtype=np.uint32), TypeError),
     (mx.array([0, 1]), ValueError), (mx.zeros((3,), mx.uint32), ValueError), (mx.zeros((1, 2), mx.uint32), ValueError)],
    ids=["int", "str", "numpy", "int32_array", "wrong_length", "wrong_rank"],
)
def test_bad_key(mlp, batch, robust, key, exc):
    x, y = batch
    raises_untouched(mlp, exc, r"^key must be a PRNG key",
                     lambda: robust.attack(x, y, mr.PGD(eps=0.1, steps=2), key=key))


@pytest.mark.parametrize("seed", [-1, 1.5, "0", None, True])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match=r"^seed must be a non-negative integer"):
        mr.key(seed)


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, "8"])
def test_bad_batch_size(mlp, batch, robust, batch_size):
    x, y = batch
    raises_untouched(mlp, ValueError, r"^batch_size must be a positive integer",
                     lambda: robust.attack(x, y, mr.PGD(eps=0.1, steps=2), key=mr.key(0), batch_size=batch_size))


# --------------------------------------------------------------------------
# Models whose output is not (N, num_classes)


class BadOutput(nn.Module):
    """A linear classifier whose output is mangled in one of several ways."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)
        self.kind = kind

    def __call__(self, x):
        z = self.lin(x.reshape(x.shape[0], -1))
        return {
            "five_classes": lambda: z[:, :5],
            "rank1": lambda: z[:, 0],
            "rank3": lambda: z[:, :, None],
            "wrong_batch": lambda: z[:1],
            "tuple": lambda: (z, z),
            "dict": lambda: {"logits": z},
            "numpy": lambda: np.zeros((x.shape[0], 10), np.float32),
            "none": lambda: None,
        }[self.kind]()


OUTPUT_CASES = {
    # kind: (regex for robust(x), regex for robust.attack (C++))
    "five_classes": (r"^the model's output must have shape \(64, 10\), got \(64, 5\)",
                     r"^\[attack\] model output must have shape \(64, 10\) for a batch of 64, got \(64, ?5\)"),
    "rank1": (r"^the model's output must have shape \(64, 10\), got \(64,\)",
              r"^\[attack\] model output must have shape \(64, 10\)"),
    "rank3": (r"^the model's output must have shape \(64, 10\), got \(64, 10, 1\)",
              r"^\[attack\] model output must have shape \(64, 10\)"),
    "wrong_batch": (r"^the model's output must have shape \(64, 10\), got \(1, 10\)",
                    r"^\[attack\] model output must have shape \(64, 10\)"),
    "tuple": (r"^the model must return an mx.array of floating-point logits, got tuple",
              r"^\[attack\] the model must return an mx.array of floating-point logits, got tuple"),
    "dict": (r"^the model must return an mx.array of floating-point logits, got dict",
             r"^\[attack\] the model must return an mx.array of floating-point logits, got dict"),
    "numpy": (r"^the model must return an mx.array of floating-point logits, got ndarray",
              r"^\[attack\] the model must return an mx.array of floating-point logits, got .*ndarray"),
    "none": (r"^the model must return an mx.array of floating-point logits, got NoneType",
             r"^\[attack\] the model must return an mx.array of floating-point logits, got None"),
}


@pytest.mark.parametrize("kind", list(OUTPUT_CASES))
def test_bad_model_output_via_call(batch, kind):
    model = BadOutput(kind)
    model.train()  # a non-default mode that must survive
    robust = make_robust(model)
    for fn in (robust, robust.predict):
        raises_untouched(model, ValueError, OUTPUT_CASES[kind][0], lambda: fn(batch[0]))


@pytest.mark.parametrize("attack", [mr.PGD(eps=0.1, steps=3), mr.FGSM(eps=0.1)], ids=["pgd", "fgsm"])
@pytest.mark.parametrize("kind", list(OUTPUT_CASES))
def test_bad_model_output_via_attack(mlp, batch, kind, attack):
    x, y = batch
    model = BadOutput(kind)
    model.train()
    model.lin.eval()  # mixed per-module modes must come back exactly
    bad = make_robust(model)
    # y and num_classes are given, so no Python forward runs: the C++ loop sees the output first.
    raises_untouched(model, ValueError, OUTPUT_CASES[kind][1], lambda: bad.attack(x, y, attack, key=mr.key(0)))
    assert model.training and not model.lin.training
    # The same failure again (the engine dropped its half-built entries and retraces).
    raises_untouched(model, ValueError, OUTPUT_CASES[kind][1], lambda: bad.attack(x, y, attack, key=mr.key(0)))
    # A good model still attacks correctly afterwards, deterministically.
    good = make_robust(mlp)
    snap = snapshot(mlp)
    r1 = good.attack(x, y, attack, key=mr.key(3))
    r2 = make_robust(mlp).attack(x, y, attack, key=mr.key(3))
    assert r1.x_adv.shape == x.shape and r1.success.shape == (64,) and r1.logits.shape == (64, 10)
    assert mx.array_equal(r1.x_adv, r2.x_adv)
    assert float(mx.max(r1.norms).item()) <= 0.1 + 1e-6
    # success agrees with the logits returned and with a fresh forward pass on x_adv
    pred = np.array(mx.argmax(mlp(r1.x_adv), axis=-1))
    np.testing.assert_array_equal(np.array(r1.success), pred != np.array(y))
    assert_unchanged(mlp, snap)


def test_num_classes_mismatch_is_reported(mlp, batch):
    x, y = batch
    robust = make_robust(mlp, num_classes=5)
    raises_untouched(mlp, ValueError, r"^the model's output must have shape \(64, 5\), got \(64, 10\)", lambda: robust(x))
    raises_untouched(mlp, ValueError, r"^\[attack\] model output must have shape \(64, 5\)",
                     lambda: robust.attack(x, np.array(y) % 5, mr.PGD(eps=0.1, steps=2), key=mr.key(0)))


def test_model_raising_inside_attack_is_restored(mlp, batch):
    """A model that fails inside the traced step (here: wrong feature size) leaves no trace."""
    x, y = batch
    robust = make_robust(mlp, input_shape=None)
    snap = snapshot(mlp)
    with pytest.raises(ValueError, match=r"addmm|matmul|shape"):
        robust.attack(mx.zeros((4, 7, 7, 1)), np.zeros(4, np.int64), mr.PGD(eps=0.1, steps=2), key=mr.key(0))
    assert_unchanged(mlp, snap)
    res = robust.attack(x, y, mr.PGD(eps=0.1, steps=2), key=mr.key(0))
    assert res.x_adv.shape == x.shape
    assert_unchanged(mlp, snap)


# --------------------------------------------------------------------------
# RobustModel constructor


class NotAModule:
    def __call__(self, x):
        return x


CTOR_CASES = [
    (dict(model=NotAModule()), TypeError, r"^model must be an mlx.nn.Module, got NotAModule"),
    (dict(model=lambda x: x), TypeError, r"^model must be an mlx.nn.Module, got function"),
    (dict(model=None), TypeError, r"^model must be an mlx.nn.Module, got NoneType"),
    (dict(bounds=(1.0, 0.0)), ValueError, r"^bounds must be finite with lo < hi"),
    (dict(bounds=(0.5, 0.5)), ValueError, r"^bounds must be finite with lo < hi"),
    (dict(bounds=(NAN, 1.0)), ValueError, r"^bounds must be finite with lo < hi"),
    (dict(bounds=(0.0, NAN)), ValueError, r"^bounds must be finite with lo < hi"),
    (dict(bounds=(0.0, INF)), ValueError, r"^bounds must be finite with lo < hi"),
    (dict(bounds=(0.0,)), ValueError, r"^bounds must be a pair of numbers"),
    (dict(bounds=(0.0, 1.0, 2.0)), ValueError, r"^bounds must be a pair of numbers"),
    (dict(bounds=None), ValueError, r"^bounds must be a pair of numbers"),
    (dict(bounds=("a", "b")), ValueError, r"^bounds must be a pair of numbers"),
    (dict(input_shape=(8, 0, 1)), ValueError, r"^input_shape must be a tuple of positive ints"),
    (dict(input_shape=(8, -8, 1)), ValueError, r"^input_shape must be a tuple of positive ints"),
    (dict(input_shape=()), ValueError, r"^input_shape must be a tuple of positive ints"),
    (dict(input_shape=(8.0, 8, 1)), ValueError, r"^input_shape must be a tuple of positive ints"),
    (dict(num_classes=1), ValueError, r"^num_classes must be an integer >= 2, got 1"),
    (dict(num_classes=0), ValueError, r"^num_classes must be an integer >= 2, got 0"),
    (dict(num_classes=-10), ValueError, r"^num_classes must be an integer >= 2"),
    (dict(num_classes=10.0), ValueError, r"^num_classes must be an integer >= 2, got 10.0"),
    (dict(on_invalid="ignore"), ValueError, r"^on_invalid must be one of \('raise', 'clip'\), got 'ignore'"),
    (dict(on_invalid=None), ValueError, r"^on_invalid must be one of"),
]


@pytest.mark.parametrize("kwargs,exc,match", CTOR_CASES, ids=[f"{k}={v!r}" for c in CTOR_CASES for k, v in c[0].items()])
def test_bad_constructor_args(mlp, kwargs, exc, match):
    kw = dict(model=mlp, bounds=(0.0, 1.0), input_shape=SHAPE, num_classes=10)
    kw.update(kwargs)
    model = kw.pop("model")
    raises_untouched(mlp, exc, match, lambda: mr.RobustModel(model, **kw))


def test_good_constructor_and_inferred_num_classes(mlp, batch):
    robust = mr.RobustModel(mlp, bounds=[-1, 2], input_shape=[8, 8, 1])
    assert robust.bounds == (-1.0, 2.0) and robust.input_shape == SHAPE
    with pytest.raises(ValueError, match=r"^num_classes is not known yet"):
        robust.num_classes
    robust(batch[0][:2])
    assert robust.num_classes == 10


# --------------------------------------------------------------------------
# The C++ core called directly: bad arguments raise Python exceptions, never abort

W = mx.array(np.random.default_rng(0).normal(size=(64, 10)).astype(np.float32) * 0.1)
B = mx.zeros((10,))


def linear_forward(params, x):
    return x.reshape(x.shape[0], -1) @ params[0] + params[1]


def core_args(n=4, **over):
    rng = np.random.default_rng(1)
    args = dict(
        forward=linear_forward,
        params=[W, B],
        x0=mx.array(rng.uniform(0, 1, (n, 8, 8, 1)).astype(np.float32)),
        y=mx.array(np.arange(n) % 10, mx.int32),
        eps=mx.full((n,), 0.1),
        step_size=mx.full((n,), 0.05),
        lo=mx.array(0.0),
        hi=mx.array(1.0),
        num_classes=10,
        steps=2,
        key=mx.random.key(0),
    )
    args.update(over)
    return args


def check_core_output(out, n=4):
    x_adv, success, loss, logits, norms = out
    assert x_adv.shape == (n, 8, 8, 1) and success.shape == (n,) and loss.shape == (n,)
    assert logits.shape == (n, 10) and norms.shape == (n,)
    assert float(mx.max(norms).item()) <= 0.1 + 1e-6


CORE_BAD = [
    ("y_short", dict(y=mx.zeros((3,), mx.int32)), ValueError, r"y must have shape \(N,\) matching x"),
    ("y_2d", dict(y=mx.zeros((4, 1), mx.int32)), ValueError, r"y must have shape \(N,\) matching x"),
    ("eps_2d", dict(eps=mx.full((4, 1), 0.1)), ValueError, r"eps and step_size must have shape \(N,\)"),
    ("eps_short", dict(eps=mx.full((3,), 0.1)), ValueError, r"eps and step_size must have shape \(N,\)"),
    ("eps_scalar", dict(eps=mx.array(0.1)), ValueError, r"eps and step_size must have shape \(N,\)"),
    ("step_size_long", dict(step_size=mx.full((5,), 0.1)), ValueError, r"eps and step_size must have shape"),
    ("steps_0", dict(steps=0), ValueError, r"steps and restarts must be >= 1"),
    ("steps_neg", dict(steps=-1), ValueError, r"steps and restarts must be >= 1"),
    ("restarts_0", dict(restarts=0), ValueError, r"steps and restarts must be >= 1"),
    ("unroll_neg", dict(unroll=-1), ValueError, r"unroll must be >= 0"),
    ("norm_l7", dict(norm="l7"), ValueError, r"norm must be 'linf' or 'l2', got 'l7'"),
    ("loss_bad", dict(loss="hinge"), ValueError, r"loss must be 'ce', 'margin' or 'kl', got 'hinge'"),
    ("num_classes_0", dict(num_classes=0), ValueError, r"num_classes must be >= 1"),
    ("x_int", dict(x0=mx.zeros((4, 8, 8, 1), mx.int32)), ValueError, r"x must be floating point"),
    ("x_rank1", dict(x0=mx.zeros((4,))), ValueError, r"x must be a non-empty batch of rank >= 2"),
    ("x_empty", dict(x0=mx.zeros((0, 8, 8, 1))), ValueError, r"x must be a non-empty batch"),
    ("forward_not_callable", dict(forward=3), ValueError, r"forward must be callable"),
    ("early_stop_without_track_best", dict(early_stop=True, track_best=False), ValueError, r"early_stop needs track_best"),
    ("steps_float", dict(steps=1.5), TypeError, r"incompatible function arguments"),
    ("x_numpy", dict(x0=np.zeros((4, 8, 8, 1), np.float32)), TypeError, r"incompatible function arguments"),
]


@pytest.mark.parametrize("over,exc,match", [c[1:] for c in CORE_BAD], ids=[c[0] for c in CORE_BAD])
def test_core_engine_bad_arguments(over, exc, match):
    engine = _core.AttackEngine()
    a = core_args(**over)
    with pytest.raises(exc, match=match):
        engine.run(a.pop("forward"), a.pop("params"), a.pop("x0"), a.pop("y"), a.pop("eps"),
                   a.pop("step_size"), a.pop("lo"), a.pop("hi"), **a)
    # the engine is still usable
    check_core_output(_run_core(engine))
    assert engine.trace_count > 0


def _run_core(engine, **over):
    a = core_args(**over)
    return engine.run(a.pop("forward"), a.pop("params"), a.pop("x0"), a.pop("y"), a.pop("eps"),
                      a.pop("step_size"), a.pop("lo"), a.pop("hi"), **a)


def test_core_forward_raising_propagates_and_engine_recovers():
    engine = _core.AttackEngine()
    error = RuntimeError("model exploded")
    calls = []

    def boom(params, x):
        calls.append(x.shape)
        raise error

    with pytest.raises(RuntimeError, match=r"^model exploded$") as info:
        _run_core(engine, forward=boom)
    assert info.value is error  # the very exception object, not a translated copy
    assert calls  # the forward really ran
    check_core_output(_run_core(engine))  # a good forward on the same engine works
    # and once more failing after a successful compile for a different shape
    with pytest.raises(RuntimeError, match=r"^model exploded$"):
        _run_core(engine, forward=boom, **_other_shape())
    check_core_output(_run_core(engine))


def _other_shape():
    n = 2
    return dict(x0=mx.full((n, 8, 8, 1), 0.5), y=mx.zeros((n,), mx.int32), eps=mx.full((n,), 0.1),
                step_size=mx.full((n,), 0.05))


@pytest.mark.parametrize(
    "ret,tname",
    [(5, "int"), (None, "NoneType"), ((1, 2), "tuple"), ("logits", "str"), (np.zeros((4, 10), np.float32), "ndarray")],
    ids=["int", "none", "tuple", "str", "numpy"],
)
def test_core_forward_returning_non_array(ret, tname):
    # A fresh engine: the forward is only called while a step is traced (compiled steps are cached).
    engine = _core.AttackEngine()
    with pytest.raises(ValueError, match=rf"the model must return an mx.array of floating-point logits, got .*{tname}"):
        _run_core(engine, forward=lambda params, x: ret)
    check_core_output(_run_core(engine))


@pytest.mark.parametrize(
    "out,match",
    [(lambda z: z[:, :5], r"model output must have shape \(4, 10\)"),
     (lambda z: z[:, 0], r"model output must have shape \(4, 10\)"),
     (lambda z: z.astype(mx.int32), r"model output must be floating point logits")],
    ids=["five", "rank1", "int_logits"],
)
def test_core_forward_bad_output_shape(out, match):
    engine = _core.AttackEngine()
    with pytest.raises(ValueError, match=match):
        _run_core(engine, forward=lambda p, x: out(linear_forward(p, x)))
    check_core_output(_run_core(engine))


@pytest.mark.parametrize("dtype", [mx.int32, mx.int64, mx.uint8, mx.bool_])
def test_core_validate_batch_rejects_integer_arrays(dtype):
    x = mx.zeros((3, 4), dtype)
    with pytest.raises(TypeError, match=r"\[validate\] x must be a floating-point array.*got"):
        _core.validate_batch(x, None, lo=mx.array(0.0), hi=mx.array(1.0))
    with pytest.raises(TypeError, match=r"\[validate\] inputs must be a floating-point array"):
        _core.check_batch_structure(x, None, "inputs")


@pytest.mark.parametrize(
    "x,shape,match",
    [(mx.zeros((3,)), None, r"rank >= 2"), (mx.zeros((0, 2)), None, r"empty batch"),
     (mx.zeros((3, 2)), [3], r"has shape \(3, 2\) but the model expects \(N, 3\)")],
    ids=["rank1", "empty", "sample_shape"],
)
def test_core_validate_batch_structure_errors(x, shape, match):
    with pytest.raises(ValueError, match=r"\[validate\] x .*" + match):
        _core.validate_batch(x, shape, lo=mx.array(0.0), hi=mx.array(1.0))


@pytest.mark.parametrize(
    "call,match",
    [(lambda: _core.project(mx.zeros((2, 3)), mx.zeros((2, 3)), mx.zeros((2,)), mx.array(0.0), mx.array(1.0), "l7"),
      r"norm must be 'linf' or 'l2', got 'l7'"),
     (lambda: _core.ascent_step(mx.zeros((2, 3)), mx.zeros((2, 3)), mx.zeros((2,)), "l0"), r"norm must be"),
     (lambda: _core.random_start(mx.zeros((2, 3)), mx.zeros((2,)), mx.array(0.0), mx.array(1.0), "lp", mx.random.key(0)),
      r"norm must be"),
     (lambda: _core.attack_objective(mx.zeros((2, 3)), mx.zeros((2,), mx.int32), "hinge"), r"loss must be")],
    ids=["project", "ascent_step", "random_start", "attack_objective"],
)
def test_core_helpers_bad_names(call, match):
    with pytest.raises(ValueError, match=match):
        call()


SUBPROCESS_CODE = textwrap.dedent(
    """
    import json
    import mlx.core as mx
    from mlx_robust import _core

    W = mx.zeros((64, 10)); B = mx.zeros((10,))
    good = lambda p, x: x.reshape(x.shape[0], -1) @ p[0] + p[1]
    def boom(p, x):
        raise RuntimeError("boom")
    x = mx.full((4, 8, 8, 1), 0.5); y = mx.zeros((4,), mx.int32)
    e4 = mx.full((4,), 0.1); lo = mx.array(0.0); hi = mx.array(1.0)

    def run(engine, fwd=good, y=y, eps=e4, **kw):
        kw.setdefault("steps", 2)
        return engine.run(fwd, [W, B], x, y, eps, e4, lo, hi, num_classes=10, key=mx.random.key(0), **kw)

    cases = {
        "y_wrong_length": lambda: run(_core.AttackEngine(), y=y[:3]),
        "eps_wrong_shape": lambda: run(_core.AttackEngine(), eps=mx.full((4, 2), 0.1)),
        "steps_0": lambda: run(_core.AttackEngine(), steps=0),
        "norm_l7": lambda: run(_core.AttackEngine(), norm="l7"),
        "forward_raises": lambda: run(_core.AttackEngine(), fwd=boom),
        "forward_non_array": lambda: run(_core.AttackEngine(), fwd=lambda p, x: "nope"),
        "validate_int": lambda: _core.validate_batch(mx.zeros((2, 3), mx.int32), None, lo=lo, hi=hi),
    }
    out = {}
    for name, fn in cases.items():
        try:
            fn()
            out[name] = "no error"
        except Exception as exc:
            out[name] = type(exc).__name__
    engine = _core.AttackEngine()
    try:
        run(engine, fwd=boom)
    except RuntimeError:
        pass
    out["good_after"] = list(run(engine)[0].shape)
    print(json.dumps(out))
    """
)


def test_core_errors_do_not_abort_the_process():
    proc = subprocess.run([sys.executable, "-c", SUBPROCESS_CODE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {
        "y_wrong_length": "ValueError",
        "eps_wrong_shape": "ValueError",
        "steps_0": "ValueError",
        "norm_l7": "ValueError",
        "forward_raises": "RuntimeError",
        "forward_non_array": "ValueError",
        "validate_int": "TypeError",
        "good_after": [4, 8, 8, 1],
    }
