"""Standard (non-adversarial) training helper used by the demo and tests."""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np


def accuracy(model: nn.Module, x: mx.array, y: mx.array, batch_size: int = 512) -> float:
    """Clean accuracy of ``model`` on (x, y), evaluated in eval mode; the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for s in range(0, x.shape[0], batch_size):
            pred = mx.argmax(model(x[s : s + batch_size]), axis=-1)
            correct += int(mx.sum(pred == y[s : s + batch_size]).item())
    finally:
        model.train(was_training)
    return correct / x.shape[0]


def fit(
    model: nn.Module,
    x: mx.array,
    y: mx.array,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: Optional[str] = None,
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy (the mlx-examples loop, compiled)."""
    optimizer = optim.Adam(learning_rate=learning_rate)

    def loss_fn(model, xb, yb):
        return nn.losses.cross_entropy(model(xb), yb, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step(xb, yb):
        loss, grads = loss_and_grad(model, xb, yb)
        optimizer.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    epochs_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs_iter = tqdm(epochs_iter, desc=progress, unit="epoch", leave=False)
    model.train()
    for _ in epochs_iter:
        order = mx.array(rng.permutation(n))
        # Full batches only, so the compiled step sees one shape.
        for s in range(0, n - batch_size + 1, batch_size):
            idx = order[s : s + batch_size]
            step(x[idx], y[idx])
            mx.eval(state)
    model.eval()
    return model
