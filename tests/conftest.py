"""Shared fixtures: small models trained once per session on the embedded digits."""

from __future__ import annotations

import threading

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_robust as mr
from mlx_robust.training import fit


@pytest.fixture(scope="session")
def digits():
    x_train, y_train = mr.datasets.load_digits("train")
    x_test, y_test = mr.datasets.load_digits("test")
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="session")
def mlp(digits):
    """A trained MLP 64-32-10 (fast: most attack tests use it)."""
    mx.random.seed(1)
    model = mr.models.MLP(64, hidden=(32,), num_classes=10)
    fit(model, digits[0], digits[1], epochs=20, seed=1)
    return model


@pytest.fixture(scope="session")
def cnn(digits):
    """The demo's small CNN, trained."""
    mx.random.seed(2)
    model = mr.models.SmallCNN(image_size=8, channels=(8, 16))
    fit(model, digits[0], digits[1], epochs=10, seed=2)
    return model


@pytest.fixture
def bitwise_device():
    """Run the test on the CPU device when the default device is a GPU.

    For tests whose property is bit-for-bit equality between two computations that are the same
    in exact arithmetic (one batch vs per-sample calls; a compiled vs an eager training step). On
    a GPU, MLX picks kernels by shape and fuses compiled graphs, so the two differ in the last bits,
    and sign steps and accept/reject decisions amplify that: the property under test (keys per
    sample, the same computation compiled) is the same on every device, the rounding is not.
    Measured on an H100 (mlx-cuda 0.32.4): these tests pass on its CPU device and differ on its GPU.
    """
    previous = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(previous)


def digits_robust(model: nn.Module, **kw) -> mr.RobustModel:
    """``model`` wrapped for the digits: inputs (8, 8, 1) in [0, 1], 10 classes; ``kw`` go to
    ``RobustModel`` (``noise=``, ``smoothing=``, ``on_invalid=``)."""
    return mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10, **kw)


def clean_correct(model: nn.Module, x: mx.array, y: mx.array):
    """(N,) numpy bool: whether ``model`` classifies each clean input correctly."""
    return np.array(mx.argmax(model(x), axis=-1) == y)


@pytest.fixture
def batch(digits):
    """64 test images and labels."""
    return digits[2][:64], digits[3][:64]


def snapshot(model: nn.Module):
    """Parameters (as numpy copies and identities) and per-module modes, to prove nothing changed."""
    from mlx.utils import tree_flatten

    flat = tree_flatten(model.parameters())
    return (
        {k: (id(v), mx.array(v)) for k, v in flat},
        [(name, m.training) for name, m in model.named_modules()],
    )


def assert_unchanged(model: nn.Module, snap) -> None:
    from mlx.utils import tree_flatten

    params, modes = snap
    now = dict(tree_flatten(model.parameters()))
    assert now.keys() == params.keys()
    for k, (ident, value) in params.items():
        assert id(now[k]) == ident, f"parameter {k} was replaced"
        assert mx.array_equal(now[k], value), f"parameter {k} changed"
    assert [(n, m.training) for n, m in model.named_modules()] == modes


def mlx_thread(target, *args, daemon: bool = True) -> threading.Thread:
    """A thread running ``target(*args)`` that destroys its MLX streams when it ends.

    MLX 0.32 requires ``mx.clear_streams()`` at the end of every thread that used it: without it
    the process aborts at exit ("terminate called without an active exception"), which would fail
    the suite's exit status although every test passed.
    """

    def run():
        try:
            target(*args)
        finally:
            mx.clear_streams()

    return threading.Thread(target=run, daemon=daemon)
