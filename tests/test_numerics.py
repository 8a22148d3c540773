"""Numerical stability: gradients at the bounds, float16 models, saturated softmax."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import mlx_robust as mr
from conftest import digits_robust as _robust


class Scaled(nn.Module):
    """The same classifier with logits multiplied by `scale` (what distillation at high T does)."""

    def __init__(self, inner, scale):
        super().__init__()
        self.inner = inner
        self.scale = scale

    def __call__(self, x):
        return self.inner(x) * self.scale


def test_inputs_at_the_bounds_give_finite_gradients_and_stay_inside(cnn, batch):
    x, y = batch
    for corner in (mx.zeros_like(x), mx.ones_like(x), (x > 0.5).astype(mx.float32)):
        res = _robust(cnn).attack(corner, y, mr.PGD(eps=0.2, steps=5, loss="ce"), key=mr.key(0))
        xa = np.array(res.x_adv)
        assert np.isfinite(xa).all() and xa.min() >= 0.0 and xa.max() <= 1.0
        assert np.isfinite(np.array(res.loss)).all()
        g = mx.grad(lambda z: nn.losses.cross_entropy(cnn(z), y, reduction="sum"))(corner)
        assert bool(mx.all(mx.isfinite(g)))


def test_float16_model_matches_float32(mlp, batch):
    x, y = batch
    half = mr.models.MLP(64, hidden=(32,), num_classes=10)
    half.update(mlp.parameters())
    half.set_dtype(mx.float16)
    z32, z16 = mlp(x), half(x.astype(mx.float16))
    np.testing.assert_allclose(np.array(z16.astype(mx.float32)), np.array(z32), atol=0.05, rtol=0.02)
    assert float(mx.mean(mx.argmax(z16, -1) == mx.argmax(z32, -1))) > 0.95
    # The attack computes its loss in float32 whatever the model's dtype, and returns the input dtype.
    res16 = _robust(half).attack(x.astype(mx.float16), y, mr.PGD(eps=0.1, steps=10), key=mr.key(1))
    res32 = _robust(mlp).attack(x, y, mr.PGD(eps=0.1, steps=10), key=mr.key(1))
    assert res16.x_adv.dtype == mx.float16 and res16.logits.dtype == mx.float32
    assert abs(res16.robust_accuracy - res32.robust_accuracy) <= 0.1


def test_saturated_softmax_masks_ce_but_not_the_margin_loss(mlp, digits):
    x, y = digits[2][:100], digits[3][:100]
    hot = Scaled(mlp, 1e4)  # softmax is one-hot in float32: CE and its gradient underflow to 0
    g = mx.grad(lambda z: nn.losses.cross_entropy(hot(z), y, reduction="sum"))(x)
    zero_grad = float(mx.mean(mx.all(g.reshape(100, -1) == 0, axis=1)))
    assert zero_grad > 0.5  # most correctly classified samples have no CE gradient at all
    ce = _robust(hot).attack(x, y, mr.PGD(eps=0.1, steps=20, loss="ce"), key=mr.key(2))
    margin = _robust(hot).attack(x, y, mr.PGD(eps=0.1, steps=20, loss="margin"), key=mr.key(2))
    plain = _robust(mlp).attack(x, y, mr.PGD(eps=0.1, steps=20, loss="margin"), key=mr.key(2))
    # Measured: CE leaves most samples robust on the saturated model; the margin loss does not care.
    assert margin.robust_accuracy < ce.robust_accuracy - 0.2
    # Sign steps on the margin are invariant to scaling the logits: same attack as on the plain model.
    assert abs(margin.robust_accuracy - plain.robust_accuracy) <= 0.03
    # The CE objective itself stays finite (log-sum-exp), it is just flat.
    assert np.isfinite(np.array(ce.loss)).all()
