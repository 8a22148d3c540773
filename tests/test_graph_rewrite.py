"""The core's exact max-pooling rewrite (csrc/graph_rewrite.cpp, mlx_robust.graph).

What nn.MaxPool builds for non-overlapping windows (reshape -> transpose -> max) is replaced in the
traced forward by the maximum of strided slices with MLX's own tie-splitting gradient. The property
is equality to the bit, in values and in gradients, with ties (common after a ReLU) included.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_robust as mr
from mlx_robust import _core


@pytest.fixture(autouse=True)
def fast_pool_on():
    """Each test starts with the rewrite on (whatever MLX_ROBUST_FAST_POOL said) and leaves the
    setting as it found it."""
    before = mr.fast_pooling_enabled()
    mr.set_fast_pooling(True)
    yield
    mr.set_fast_pooling(before)


def _pool(d, k):
    return {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}[d](k, k)


CASES = [
    ((4, 8, 8, 3), 2),
    ((4, 9, 9, 2), 3),
    ((2, 8, 6, 4), (2, 3)),
    ((3, 12, 5), 4),
    ((2, 4, 4, 4, 2), 2),
]


@pytest.mark.parametrize("shape,k", CASES)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_values_and_gradients_equal_bitwise_with_ties(shape, k, dtype):
    mx.random.seed(0)
    # values in {0, 1, 2}: most windows hold ties, which max's gradient splits between
    x = mx.floor(mx.random.uniform(shape=shape) * 3).astype(dtype)
    pool = _pool(len(shape) - 2, k)
    w = mx.random.normal(pool(x).shape).astype(dtype)
    counts = []

    def plain(x):
        return mx.sum(pool(x) * w)

    def rewritten(x):
        out, n = _core.rewrite_window_max(pool(x))
        counts.append(n)
        return mx.sum(out * w)

    y, n = _core.rewrite_window_max(pool(x))
    assert n == 1
    assert y.dtype == dtype and mx.array_equal(y, pool(x)).item()
    g0 = mx.grad(plain)(x)
    assert mx.array_equal(g0, mx.grad(rewritten)(x)).item()
    assert mx.array_equal(g0, mx.compile(mx.grad(rewritten))(x)).item()
    assert counts == [1, 1]


def test_tie_split_matches_max_gradient_by_hand():
    x = mx.array([[1.0, 1.0, 0.0, 3.0], [1.0, 1.0, 3.0, 2.0]]).reshape(1, 2, 4, 1)
    f = lambda x: mx.sum(_core.rewrite_window_max(nn.MaxPool2d(2, 2)(x))[0] * mx.array([8.0, 4.0]).reshape(1, 1, 2, 1))
    g = mx.grad(f)(x).reshape(2, 4)
    # window 1: four ones share 8 -> 2 each; window 2: two threes share 4 -> 2 each
    assert g.tolist() == [[2.0, 2.0, 0.0, 2.0], [2.0, 2.0, 2.0, 0.0]]


def test_whole_model_graph_rewrites_every_pool():
    mx.random.seed(1)
    m = mr.models.SmallCNN(1, 10, 8, (4, 8))
    x = mx.random.uniform(shape=(5, 8, 8, 1))
    c = mx.arange(10).astype(mx.float32)
    counts = []

    def f(x, rewrite):
        out = m(x)
        if rewrite:
            out, n = _core.rewrite_window_max(out)
            counts.append(n)
        return mx.sum(out * c)

    assert mx.array_equal(mx.grad(lambda x: f(x, False))(x), mx.grad(lambda x: f(x, True))(x)).item()
    assert counts == [2]


def test_output_that_is_the_window_max_itself_is_replaced():
    x = mx.floor(mx.random.uniform(shape=(2, 4, 6, 3)) * 3)
    windows = x.reshape(2, 2, 2, 3, 2, 3).transpose(0, 1, 3, 2, 4, 5)
    r = mx.max(windows, axis=(3, 4), keepdims=True)  # the Reduce node is the root
    y, n = _core.rewrite_window_max(r)
    assert n == 1 and y.shape == r.shape and mx.array_equal(y, r).item()


def test_shared_pool_output_is_replaced_once_for_all_its_users():
    x = mx.random.uniform(shape=(2, 4, 4, 3))
    p = nn.MaxPool2d(2, 2)(x)
    out = p * 2.0 + mx.exp(p)
    y, n = _core.rewrite_window_max(out)
    assert n == 1 and mx.allclose(y, out).item()


@pytest.mark.parametrize(
    "build",
    [
        lambda x: nn.MaxPool2d(3, 2)(x),  # overlapping windows (as_strided)
        lambda x: nn.MaxPool2d(2, 2)(x[:, :7, :7]),  # 7 not divisible: as_strided
        lambda x: nn.AvgPool2d(2, 2)(x),  # a sum, not a max: left alone
        lambda x: mx.max(x.reshape(2, 4, 2, 4, 2, 3), axis=(2, 4)),  # no transpose
        lambda x: mx.max(x.reshape(2, 4, 2, 4, 2, 3).transpose(0, 1, 3, 2, 4, 5), axis=(4,)),  # one axis
        lambda x: mx.max(x, axis=(1, 2)),  # a global max
    ],
)
def test_other_patterns_are_left_alone(build):
    x = mx.random.uniform(shape=(2, 8, 8, 3))
    out = build(x)
    y, n = _core.rewrite_window_max(out)
    assert n == 0 and mx.array_equal(y, out).item()


def test_integer_and_evaluated_graphs_are_left_alone():
    xi = (mx.random.uniform(shape=(2, 4, 4, 3)) * 10).astype(mx.int32)
    assert _core.rewrite_window_max(nn.MaxPool2d(2, 2)(xi))[1] == 0
    p = nn.MaxPool2d(2, 2)(mx.random.uniform(shape=(2, 4, 4, 3)))
    mx.eval(p)
    assert _core.rewrite_window_max(p * 2)[1] == 0


def test_switch_and_disabled_path():
    mr.set_fast_pooling(True)
    assert mr.fast_pooling_enabled()
    mr.set_fast_pooling(False)
    assert not mr.fast_pooling_enabled()
    assert _core.rewrite_window_max(nn.MaxPool2d(2, 2)(mx.random.uniform(shape=(1, 4, 4, 1))))[1] == 0
    with pytest.raises(TypeError, match="enabled"):
        mr.set_fast_pooling(1)


@pytest.mark.parametrize(
    "attack",
    [
        mr.PGD(eps=0.1, steps=8, step_size=0.02, random_start=True, restarts=2),
        mr.PGD(eps=1.0, steps=6, step_size=0.3, norm="l2", random_start=False),
        mr.FGSM(eps=0.1),
        mr.APGD(eps=0.1, steps=10),
        mr.CW(steps=10, binary_search_steps=2),
    ],
    ids=["pgd-linf", "pgd-l2", "fgsm", "apgd", "cw"],
)
def test_attacks_identical_with_and_without_rewrite(cnn, batch, attack):
    x, y = batch
    robust = mr.RobustModel(cnn, input_shape=(8, 8, 1), num_classes=10)
    on = robust.attack(x, y, attack, key=mr.key(3))
    assert _core.last_rewrite_count() == 2  # the core traced the model with both pools rewritten
    traces = robust._fn.trace_count
    mr.set_fast_pooling(False)
    off = robust.attack(x, y, attack, key=mr.key(3))
    assert _core.last_rewrite_count() == 0
    assert mx.array_equal(on.x_adv, off.x_adv).item()
    assert mx.array_equal(on.success, off.success).item()
    assert robust._fn.trace_count > traces  # compiled functions are keyed on the setting


def test_smoothing_counts_identical_with_and_without_rewrite(cnn, batch):
    x, _ = batch
    fn = mr.RobustModel(cnn, input_shape=(8, 8, 1), num_classes=10)._smooth_fn
    keys = mr.smoothing.sample_keys(mr.key(5), 3)
    args = dict(n=150, sigma=0.25, batch_size=64, num_classes=10, overlap=False)
    on = fn.vote_counts(x[:3], keys, **args)
    mr.set_fast_pooling(False)
    off = fn.vote_counts(x[:3], keys, **args)
    assert mx.array_equal(on, off).item() and int(mx.sum(on).item()) == 3 * 150
