"""Defensive distillation (Papernot et al. 2016) and the attack that defeats it (Carlini & Wagner 2016)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import assert_unchanged, snapshot

import mlx_robust as mr
from mlx_robust.distillation import defensive_distillation, soft_labels, train_at_temperature
from mlx_robust.training import fit

EPS = 0.1


def _mlp(seed: int):
    mx.random.seed(seed)
    return mr.models.MLP(64, hidden=(32,), num_classes=10)


@pytest.fixture(scope="module")
def distilled(digits):
    x, y = digits[0], digits[1]
    teacher, student = _mlp(0), _mlp(1)
    defensive_distillation(teacher, student, x, y, temperature=100.0, epochs=30, learning_rate=1e-2, seed=0)
    return teacher, student


def _robust_accuracies(model, x, y):
    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10)
    return {
        loss: robust.attack(x, y, mr.PGD(eps=EPS, steps=20, loss=loss), key=mr.key(0)).robust_accuracy
        for loss in ("ce", "margin")
    }


def test_distillation_masks_ce_gradients_but_the_margin_attack_breaks_it(digits, distilled, mlp):
    """The gap Carlini & Wagner (2016) point out: PGD on CE stalls on the distilled model (its
    softmax saturates), PGD on the logit margin does not. On an ordinary model both agree."""
    _, student = distilled
    x, y = digits[2], digits[3]
    clean = float(mx.mean(mx.argmax(student(x), axis=-1) == y))
    assert clean > 0.9
    acc = _robust_accuracies(student, x, y)
    assert acc["ce"] - acc["margin"] >= 0.30, acc
    plain = _robust_accuracies(mlp, x, y)
    assert abs(plain["ce"] - plain["margin"]) < 0.10, plain


def test_deployed_student_has_saturated_softmax(digits, distilled):
    """At T=1 the student's logits are ~T times larger: the CE gradient underflows to exactly 0."""
    _, student = distilled
    x, y = digits[2][:64], digits[3][:64]
    z = student(x)
    top2 = mx.topk(z, 2, axis=-1)
    assert float(mx.median(mx.abs(top2[:, 1] - top2[:, 0]))) > 100  # exp(-100) ~ 4e-44
    g = mx.grad(lambda xx: mx.sum(nn.losses.cross_entropy(student(xx), y)))(x)
    assert float(mx.mean((mx.max(mx.abs(g.reshape(64, -1)), axis=1) == 0).astype(mx.float32))) > 0.5


def test_soft_labels_are_probabilities_and_softer_at_higher_temperature(digits, mlp):
    x = digits[2][:32]
    snap = snapshot(mlp)
    p1, p10 = soft_labels(mlp, x, 1.0), soft_labels(mlp, x, 10.0)
    assert_unchanged(mlp, snap)
    assert p1.shape == (32, 10)
    np.testing.assert_allclose(np.array(mx.sum(p10, axis=-1)), 1.0, rtol=1e-5)

    def entropy(p):
        return float(mx.mean(-mx.sum(p * mx.log(p + 1e-30), axis=-1)))

    assert entropy(p10) > entropy(p1)


def test_train_at_temperature_accepts_labels_or_probabilities(digits):
    x, y = digits[0][:256], digits[1][:256]
    model = _mlp(2)
    train_at_temperature(model, x, y, 5.0, epochs=3)
    assert not model.training
    targets = soft_labels(model, x, 5.0)
    student = _mlp(3)
    train_at_temperature(student, x, targets, 5.0, epochs=3)
    agree = float(mx.mean(mx.argmax(student(x), -1) == mx.argmax(targets, -1)))
    assert agree > 0.6


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"temperature": -5.0}, ValueError, "temperature"),
        ({"temperature": float("inf")}, ValueError, "temperature"),
        ({"epochs": -1}, ValueError, "epochs"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"learning_rate": 0.0}, ValueError, "learning_rate"),
    ],
)
def test_bad_settings_raise(digits, kwargs, error, match):
    x, y = digits[0][:128], digits[1][:128]
    with pytest.raises(error, match=match):
        defensive_distillation(_mlp(0), _mlp(1), x, y, **kwargs)


def test_bad_models_and_data_raise(digits):
    x, y = digits[0][:128], digits[1][:128]
    m = _mlp(0)
    with pytest.raises(ValueError, match="different models"):
        defensive_distillation(m, m, x, y)
    with pytest.raises(TypeError, match="nn.Module"):
        defensive_distillation("teacher", m, x, y)
    with pytest.raises(ValueError, match="y has 100 labels"):
        defensive_distillation(_mlp(0), m, x, y[:100])
    with pytest.raises(ValueError, match="targets has 5 rows"):
        train_at_temperature(m, x, mx.ones((5, 10)) / 10, 2.0)
    with pytest.raises(TypeError, match="teacher"):
        soft_labels(None, x, 2.0)


def test_undistilled_training_keeps_a_usable_ce_gradient(digits):
    """Control: the same MLP trained normally has non-zero CE gradients almost everywhere."""
    model = _mlp(4)
    fit(model, digits[0], digits[1], epochs=5)
    x, y = digits[2][:64], digits[3][:64]
    g = mx.grad(lambda xx: mx.sum(nn.losses.cross_entropy(model(xx), y)))(x)
    assert float(mx.mean((mx.max(mx.abs(g.reshape(64, -1)), axis=1) == 0).astype(mx.float32))) < 0.1
