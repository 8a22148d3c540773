"""Defensive distillation (Papernot et al. 2016) — and why it is not a defence.

Papernot, McDaniel, Wu, Jha & Swami, "Distillation as a Defense to Adversarial Perturbations
against Deep Neural Networks", IEEE S&P 2016, https://arxiv.org/abs/1511.04508: train a teacher
with its softmax at temperature T, label the training set with the teacher's softened
probabilities ``softmax(f(x) / T)``, train a student (same architecture) on those soft labels at
temperature T, and deploy the student at T = 1.

**It does not make the model robust.** Carlini & Wagner 2016, "Defensive Distillation is Not
Robust to Adversarial Examples" (https://arxiv.org/abs/1607.04311) and "Towards Evaluating the
Robustness of Neural Networks" (https://arxiv.org/abs/1608.04644) show that the deployed student
merely has logits about T times larger: its softmax saturates, so the cross-entropy gradient
underflows to zero in float32 and gradient attacks on the CE loss stall, while an attack on the
logits (the C&W margin loss ``max_{j != y} z_j - z_y``, ``mr.PGD(loss="margin")``) breaks it as
easily as an undefended model. Evaluate distilled models with ``loss="margin"``; treat this module
as a teaching example of gradient masking.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_robust import _functional
from mlx_robust._checks import check_int
from mlx_robust.validation import as_batch, as_labels

__all__ = ["defensive_distillation", "soft_labels", "train_at_temperature"]


def _check_temperature(temperature: Any) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def soft_labels(teacher: nn.Module, x: Any, temperature: float, *, batch_size: int = 512) -> mx.array:
    """The teacher's softened probabilities ``softmax(teacher(x) / T)``, shape (N, C), in eval mode.

    Papernot et al. 2016 (https://arxiv.org/abs/1511.04508), step 2. The teacher is left unchanged.
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher must be an mlx.nn.Module, got {type(teacher).__name__}")
    t = _check_temperature(temperature)
    x = as_batch(x, "x")
    batch_size = check_int(batch_size, "batch_size", low=1)
    parts = []
    # A shallow copy in eval mode: the teacher itself is never touched.
    teacher_eval = _functional.model_copy(teacher, training=False)
    for s in range(0, x.shape[0], batch_size):
        p = mx.softmax(teacher_eval(x[s : s + batch_size]).astype(mx.float32) / t, axis=-1)
        mx.eval(p)
        parts.append(p)
    return mx.concatenate(parts, axis=0)


def train_at_temperature(
    model: nn.Module,
    x: Any,
    targets: Any,
    temperature: float,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 1e-2,
    seed: int = 0,
) -> nn.Module:
    """Train ``model`` in place with its softmax at temperature T: minimise
    ``CE(softmax(model(x) / T), targets)`` with Adam (Papernot et al. 2016, steps 1 and 3).

    ``targets``: integer labels (N,) (the teacher) or probabilities (N, C) (the student's soft
    labels). Returns ``model``, left in eval mode (deploy it as is: that is temperature 1).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an mlx.nn.Module, got {type(model).__name__}")
    t = _check_temperature(temperature)
    epochs = check_int(epochs, "epochs", low=0)
    batch_size = check_int(batch_size, "batch_size", low=1)
    seed = check_int(seed, "seed", low=0)
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ValueError(f"learning_rate must be a number > 0, got {learning_rate!r}")
    x = as_batch(x, "x")
    n = x.shape[0]
    if isinstance(targets, mx.array) and targets.ndim == 2 or np.ndim(targets) == 2:
        targets = as_batch(targets, "targets").astype(mx.float32)
        if targets.shape[0] != n:
            raise ValueError(f"targets has {targets.shape[0]} rows but x has {n} samples")
    else:
        targets = as_labels(targets, n, None, "targets")
    if n < batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than the training set ({n} samples)")

    def loss_fn(model: nn.Module, xb: mx.array, tb: mx.array) -> mx.array:
        return nn.losses.cross_entropy(model(xb) / t, tb, reduction="mean")

    optimizer = optim.Adam(learning_rate=learning_rate)
    optimizer.init(model.trainable_parameters())
    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(xb: mx.array, tb: mx.array) -> mx.array:
        loss, grads = loss_and_grad(model, xb, tb)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(epochs):
        order = mx.array(rng.permutation(n))
        for s in range(0, n - batch_size + 1, batch_size):
            idx = order[s : s + batch_size]
            step(x[idx], targets[idx])
            mx.eval(state)
    model.eval()
    return model


def defensive_distillation(
    teacher: nn.Module,
    student: nn.Module,
    x: Any,
    y: Any,
    *,
    temperature: float = 100.0,
    epochs: int = 30,
    teacher_epochs: Optional[int] = None,
    batch_size: int = 64,
    learning_rate: float = 1e-2,
    seed: int = 0,
    train_teacher: bool = True,
) -> nn.Module:
    """Defensive distillation (Papernot et al. 2016, https://arxiv.org/abs/1511.04508).

    1. Train ``teacher`` on (x, y) at temperature T (skipped with ``train_teacher=False``).
    2. Soft labels: ``softmax(teacher(x) / T)``.
    3. Train ``student`` on the soft labels at temperature T.
    4. Deploy the student at T = 1: use it as it is.

    Not a defence: the student's logits are ~T times larger, its softmax saturates and the
    cross-entropy gradient vanishes, which stalls PGD on the CE loss but not an attack on the
    logits. Carlini & Wagner (2016, https://arxiv.org/abs/1607.04311) break it completely; evaluate
    with ``mr.PGD(loss="margin")`` (the C&W logit-margin loss), never with CE alone.

    Args:
        teacher, student: classifiers of the same task (Papernot et al. use the same architecture).
        x, y: training inputs and integer labels.
        temperature: T > 0 (Papernot et al. use T = 100 on MNIST).
        epochs: student epochs; ``teacher_epochs`` defaults to the same.
        batch_size, learning_rate, seed: Adam training settings. The default learning rate is
            high (1e-2) because at temperature T the logits must grow about T times larger.
        train_teacher: train the teacher first (False: use it as given).

    Returns:
        ``student``, trained in place and left in eval mode.
    """
    t = _check_temperature(temperature)
    if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
        raise TypeError("teacher and student must be mlx.nn.Module instances")
    if teacher is student:
        raise ValueError("teacher and student must be different models")
    x = as_batch(x, "x")
    y = as_labels(y, x.shape[0], None, "y")
    if train_teacher:
        train_at_temperature(teacher, x, y, t, epochs=epochs if teacher_epochs is None else teacher_epochs,
                             batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    targets = soft_labels(teacher, x, t)
    return train_at_temperature(student, x, targets, t, epochs=epochs, batch_size=batch_size,
                                learning_rate=learning_rate, seed=seed + 1)
