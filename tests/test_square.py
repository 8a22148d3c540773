"""Square attack (Andriushchenko et al. 2020): properties, C++ core vs the plain-MLX reference,
batch independence of its randomness, the compiled loop's contracts, and the gradient-masking
check it exists for."""

from __future__ import annotations

import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import assert_unchanged, snapshot, digits_robust as _robust, clean_correct as _clean_correct

import mlx_robust as mr
from mlx_robust import _functional
from reference import (
    square_p_selection,
    square_pattern,
    square_reference,
    square_window_size,
)

SQUARES = {
    "linf": lambda eps: mr.Square(eps=eps, n_queries=150),
    "l2": lambda eps: mr.Square(eps=eps * 8, n_queries=150, norm="l2"),
    "linf-ce": lambda eps: mr.Square(eps=eps, n_queries=100, loss="ce", p_init=0.5),
}


def _norms(delta, norm):
    d = np.array(delta).reshape(delta.shape[0], -1)
    return np.abs(d).max(1) if norm == "linf" else np.sqrt((d**2).sum(1))


# --- properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SQUARES)
def test_inside_ball_bounds_and_consistent_result(mlp, batch, name):
    x, y = batch
    attack = SQUARES[name](0.1)
    mlp.eval()
    res = _robust(mlp).attack(x, y, attack, key=mr.key(0))
    assert isinstance(res, mr.SquareResult)
    assert res.x_adv.shape == x.shape and res.x_adv.dtype == x.dtype
    norms = _norms(res.x_adv - x, attack.norm)
    assert np.all(norms <= float(attack.eps) * (1 + 1e-5) + 1e-6)
    np.testing.assert_allclose(np.array(res.norms), norms, rtol=1e-5, atol=1e-6)
    xa = np.array(res.x_adv)
    assert xa.min() >= 0.0 and xa.max() <= 1.0
    # Success, logits and loss describe x_adv itself.
    np.testing.assert_allclose(np.array(res.logits), np.array(mlp(res.x_adv)), rtol=1e-4, atol=1e-4)
    assert np.array_equal(np.array(res.success), np.array(res.predictions != y))
    # Queries: none for samples misclassified already, the whole budget for failures.
    q, s, clean = np.array(res.queries), np.array(res.success), _clean_correct(mlp, x, y)
    assert np.all(q[~clean] == 0)
    assert np.all(q[~s] == attack.n_queries)
    assert np.all((q[s & clean] >= 1) & (q[s & clean] <= attack.n_queries))


@pytest.mark.parametrize("name", SQUARES)
def test_eps_zero_gives_no_success(mlp, batch, name):
    x, y = batch
    res = _robust(mlp).attack(x, y, SQUARES[name](0.0), key=mr.key(1))
    assert mx.array_equal(res.x_adv, x)
    assert np.array_equal(np.array(res.success), ~_clean_correct(mlp, x, y))


@pytest.mark.parametrize("name", SQUARES)
def test_robust_at_most_clean_per_sample_and_input_not_mutated(mlp, batch, name):
    x, y = batch
    x_copy, y_copy = mx.array(x), mx.array(y)
    res = _robust(mlp).attack(x, y, SQUARES[name](0.1), key=mr.key(2))
    clean = _clean_correct(mlp, x, y)
    robust_correct = ~np.array(res.success)
    assert np.all(robust_correct <= clean)
    assert robust_correct.mean() < clean.mean() - 0.1  # and it does find adversarial examples
    assert mx.array_equal(x, x_copy) and mx.array_equal(y, y_copy)


@pytest.mark.parametrize("name", ["linf", "l2"])
def test_model_untouched(mlp, batch, name):
    x, y = batch
    mlp.train()  # a mode the attack must switch away from and back to
    snap = snapshot(mlp)
    _robust(mlp).attack(x, y, SQUARES[name](0.1), key=mr.key(3))
    assert_unchanged(mlp, snap)
    mlp.eval()


def test_targeted_success_means_target(mlp, batch):
    x, y = batch
    target = (y + 1) % 10
    res = _robust(mlp).attack(x, y, mr.Square(eps=0.2, n_queries=150), y_target=target, key=mr.key(4))
    hit = np.array(res.predictions == target)
    assert np.array_equal(np.array(res.success), hit)
    assert hit.mean() > 0.3  # chance is 0.1


# --- randomness: a sample's draws depend on the key and the sample only -------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_batch_equals_per_sample_with_same_key(bitwise_device, mlp, batch, norm):
    x, y = batch
    x, y = x[:6], y[:6]
    robust = _robust(mlp)
    attack = mr.Square(eps=0.1 if norm == "linf" else 0.8, n_queries=60, norm=norm, unroll=4)
    whole = robust.attack(x, y, attack, key=mr.key(5))

    def same(a, b, rows):
        assert mx.array_equal(a.x_adv, b.x_adv[rows])
        assert mx.array_equal(a.success, b.success[rows])
        assert mx.array_equal(a.queries, b.queries[rows])

    for i in (0, 3):
        same(robust.attack(x[i : i + 1], y[i : i + 1], attack, key=mr.key(5)), whole, slice(i, i + 1))
    perm = mx.array([5, 2, 0, 4, 1, 3])
    same(robust.attack(x[perm], y[perm], attack, key=mr.key(5)), whole, perm)
    halves = robust.attack(x, y, attack, key=mr.key(5), batch_size=4)
    assert mx.array_equal(halves.x_adv, whole.x_adv)
    # Neither early stop nor the unroll depth changes any draw.
    for other in (mr.Square(eps=attack.eps, n_queries=60, norm=norm, unroll=3, early_stop=False),):
        same(robust.attack(x, y, other, key=mr.key(5)), whole, slice(None))
    assert not mx.array_equal(robust.attack(x, y, attack, key=mr.key(6)).x_adv, whole.x_adv)


def test_queries_survive_batch_size(bitwise_device, mlp, batch):
    """Results are merged by field name: a split batch keeps SquareResult and its query counts."""
    x, y = batch
    x, y = x[:6], y[:6]
    robust = _robust(mlp)
    attack = mr.Square(eps=0.1, n_queries=60, unroll=4)
    whole = robust.attack(x, y, attack, key=mr.key(5))
    split = robust.attack(x, y, attack, key=mr.key(5), batch_size=4)
    assert isinstance(split, mr.SquareResult)
    assert split.queries is not None and split.queries.shape == (6,)
    assert mx.array_equal(split.queries, whole.queries)
    assert mx.array_equal(split.success, whole.success)
    assert split.attack == whole.attack and split.y_target is None


# --- C++ core vs the plain-MLX reference ----------------------------------------------------------

REFERENCE_CASES = [
    dict(norm="linf", loss="margin", targeted=False, eps=0.1),
    dict(norm="l2", loss="margin", targeted=False, eps=0.8),
    dict(norm="linf", loss="ce", targeted=True, eps=0.15),
    dict(norm="l2", loss="ce", targeted=False, eps="per-sample"),
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("unroll,early_stop", [(1, False), (4, True)])
def test_core_matches_reference(mlp, batch, case, unroll, early_stop):
    x, y = batch
    x, y = x[:24], y[:24]
    n = x.shape[0]
    eps = mx.linspace(0.2, 1.2, n) if case["eps"] == "per-sample" else mx.full((n,), case["eps"])
    labels = (y + 3) % 10 if case["targeted"] else y
    mlp.eval()
    ref = square_reference(
        mlp, x, labels, eps, 0.0, 1.0, norm=case["norm"], loss=case["loss"], n_queries=80,
        targeted=case["targeted"], key=mr.key(7),
    )
    x_adv, success, loss, logits, norms, queries = _functional.run_square(
        _robust(mlp)._fn, x, labels, eps, (0.0, 1.0), num_classes=10, norm=case["norm"], loss=case["loss"],
        n_queries=80, p_init=0.8, targeted=case["targeted"], early_stop=early_stop, unroll=unroll, key=mr.key(7),
    )
    # Same draws, same ops in the same order: identical.
    np.testing.assert_allclose(np.array(x_adv), np.array(ref[0]), atol=1e-6)
    assert np.array_equal(np.array(success), np.array(ref[1]))
    np.testing.assert_allclose(np.array(loss), np.array(ref[2]), rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.array(queries), np.array(ref[4]))
    assert 0 < np.array(success).mean() < 1  # a case where both outcomes occur


@pytest.mark.parametrize("n_queries", [1, 7, 100, 1000, 10000])
@pytest.mark.parametrize("norm,shape", [("linf", (8, 8, 1)), ("l2", (8, 8, 1)), ("linf", (32, 32, 3)), ("l2", (28, 20, 1))])
def test_schedule_matches_official(n_queries, norm, shape):
    h, w, c = shape
    got = _functional.square_schedule(n_queries, 0.8, shape, norm)
    want = [square_window_size(square_p_selection(0.8, i, n_queries), h, w, c, norm) for i in range(n_queries - 1)]
    assert got == want
    assert len(got) == n_queries - 1


def test_schedule_halves_at_the_papers_boundaries():
    # p_init = 1 on 100 x 100: s = round(sqrt(p) * 100) shows each halving of p.
    sizes = _functional.square_schedule(10000, 1.0, (100, 100, 1), "linf")
    want = {0: 99, 10: 99, 11: 71, 50: 71, 51: 50, 201: 35, 501: 25, 1001: 18, 2001: 12, 4001: 9, 6001: 6, 8001: 4}
    assert {i: sizes[i] for i in want} == want
    # Rescaled by n_queries / 10000: at 1000 queries the first halving comes after iteration 1.
    small = _functional.square_schedule(1000, 1.0, (100, 100, 1), "linf")
    assert small[:3] == [99, 99, 71] and small[-1] == 4


@pytest.mark.parametrize("s", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("transpose", [False, True])
def test_l2_pattern_matches_official(s, transpose):
    got = np.array(_functional.square_pattern(s, transpose), np.float32).reshape(s, s)
    want = square_pattern(s, transpose).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert abs(np.sqrt((want.astype(np.float64) ** 2).sum()) - 1.0) < 1e-6


# --- no gradient: the gradient-masking check ---------------------------------------------------


@mx.custom_function
def _quantize_no_grad(x):
    return mx.round(x * 8) / 8


@_quantize_no_grad.vjp
def _quantize_vjp(primals, cotangent, output):
    raise RuntimeError("the gradient of the model was requested")


class Quantized(nn.Module):
    """A rounding input layer: the gradient is zero almost everywhere (or, with ``forbid_grad``,
    asking for it raises)."""

    def __init__(self, inner, forbid_grad=False):
        super().__init__()
        self.inner = inner
        self.forbid_grad = forbid_grad

    def __call__(self, x):
        return self.inner(_quantize_no_grad(x) if self.forbid_grad else mx.round(x * 8) / 8)


def test_square_breaks_gradient_masking_where_pgd_fails(mlp, digits):
    x, y = digits[2][:96], digits[3][:96]
    masked = _robust(Quantized(mlp))
    clean = _clean_correct(Quantized(mlp), x, y).mean()
    pgd = masked.attack(x, y, mr.PGD(eps=0.15, steps=20), key=mr.key(8))
    square = masked.attack(x, y, mr.Square(eps=0.15, n_queries=300), key=mr.key(8))
    assert clean > 0.8
    assert pgd.robust_accuracy > clean - 0.15  # zero gradients: PGD barely moves
    assert square.robust_accuracy < pgd.robust_accuracy - 0.3


def test_no_gradient_is_ever_taken(mlp, batch):
    x, y = batch
    forbidden = _robust(Quantized(mlp, forbid_grad=True))
    with pytest.raises(RuntimeError, match="gradient"):
        forbidden.attack(x, y, mr.PGD(eps=0.15, steps=2), key=mr.key(9))
    res = forbidden.attack(x, y, mr.Square(eps=0.15, n_queries=100), key=mr.key(9))
    assert res.success_rate > 0.3


# --- the compiled loop's contracts -----------------------------------------------------------------


class Counting(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        # Not a plain int attribute: the library runs a shallow copy of the model, which shares
        # this object (an int would count on the copy).
        self.counter = types.SimpleNamespace(calls=0)

    @property
    def calls(self):
        return self.counter.calls

    def __call__(self, x):
        self.counter.calls += 1
        return self.inner(x)


def test_trace_count_constant_and_model_not_called_per_query(mlp, batch):
    x, y = batch
    model = Counting(mlp)
    robust = _robust(model)
    attack = mr.Square(eps=0.1, n_queries=120, unroll=5, early_stop=False)
    robust.attack(x, y, attack, key=mr.key(10))
    traces, calls = _functional.square_trace_count(robust._fn), model.calls
    assert traces == 2 and calls == 2 + 5  # init (clean check + first query) and 5 unrolled queries
    for seed in range(2):
        robust.attack(x, y, attack, key=mr.key(11 + seed))
    assert _functional.square_trace_count(robust._fn) == traces  # 119 iterations, no Python
    assert model.calls == calls
    # Early stop retraces only for new (power-of-two) batch sizes; the same call is all cached.
    es = mr.Square(eps=0.1, n_queries=120, unroll=5)
    robust.attack(x, y, es, key=mr.key(10))
    traces = _functional.square_trace_count(robust._fn)
    robust.attack(x, y, es, key=mr.key(10))
    assert _functional.square_trace_count(robust._fn) == traces


def test_random_defence_one_draw_per_query(mlp, batch):
    x, y = batch
    robust = _robust(mlp, noise=mr.GaussianNoise(0.05))
    res = robust.attack(x, y, mr.Square(eps=0.1, n_queries=50), key=mr.key(12))
    assert np.all(_norms(res.x_adv - x, "linf") <= 0.1 + 1e-6)
    again = robust.attack(x, y, mr.Square(eps=0.1, n_queries=50), key=mr.key(12))
    assert mx.array_equal(res.x_adv, again.x_adv)  # the noise is drawn from the key too


# --- bad settings -----------------------------------------------------------------------------------

BAD = [
    (dict(eps=-0.1), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(eps=0.1, n_queries=0), "n_queries"),
    (dict(eps=0.1, n_queries=2.5), "n_queries"),
    (dict(eps=0.1, norm="l1"), "norm"),
    (dict(eps=0.1, p_init=0.0), "p_init"),
    (dict(eps=0.1, p_init=1.5), "p_init"),
    (dict(eps=0.1, p_init=True), "p_init"),
    (dict(eps=0.1, loss="kl"), "loss"),
    (dict(eps=0.1, unroll=0), "unroll"),
    (dict(eps=0.1, early_stop="yes"), "early_stop"),
]


@pytest.mark.parametrize("kwargs,name", BAD, ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD)])
def test_bad_settings_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        mr.Square(**kwargs)


def test_rejects_inputs_that_are_not_nhwc(mlp, batch):
    x, y = batch
    flat = mr.RobustModel(mlp, bounds=(0.0, 1.0), num_classes=10)
    with pytest.raises(ValueError, match=r"NHWC images \(N, H, W, C\).*\(64, 64\)"):
        flat.attack(x.reshape(64, 64), y, mr.Square(eps=0.1, n_queries=10), key=mr.key(13))
    with pytest.raises(ValueError, match="eps"):
        _robust(mlp).attack(x, y, mr.Square(eps=np.full(3, 0.1), n_queries=10), key=mr.key(13))


# Each new image shape costs MLX's CPU JIT fresh kernels (seconds each on a cold cache): two shapes.
@pytest.mark.parametrize("norm,shape", [("linf", (10, 7, 3)), ("l2", (3, 5, 2))])
def test_core_matches_reference_on_colour_and_odd_shapes(norm, shape):
    # An untrained MLP attacked on its own predictions: several channels, non-square, tiny images.
    mx.random.seed(14)
    model = mr.models.MLP(int(np.prod(shape)), hidden=(16,), num_classes=4)
    x = mx.random.uniform(shape=(12, *shape), key=mr.key(14))
    y = mx.argmax(model(x), axis=-1).astype(mx.int32)
    eps = mx.full((12,), 0.3 if norm == "linf" else 1.0)
    ref = square_reference(model, x, y, eps, 0.0, 1.0, norm=norm, n_queries=40, key=mr.key(15))
    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=shape, num_classes=4)
    res = robust.attack(x, y, mr.Square(eps=eps, n_queries=40, norm=norm, unroll=3), key=mr.key(15))
    np.testing.assert_allclose(np.array(res.x_adv), np.array(ref[0]), atol=1e-6)
    assert np.array_equal(np.array(res.success), np.array(ref[1]))
    assert np.array_equal(np.array(res.queries), np.array(ref[4]))
    assert np.all(np.array(res.norms) <= np.array(eps) + 1e-5)
