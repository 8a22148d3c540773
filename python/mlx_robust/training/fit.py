"""Standard (non-adversarial) training helper used by the demo and tests."""

from __future__ import annotations

import math
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from mlx_robust._functional import model_copy


def accuracy(model: nn.Module, x: mx.array, y: mx.array, batch_size: int = 512) -> float:
    """Clean accuracy of ``model`` on (x, y), evaluated in eval mode on a shallow copy of the model:
    the model itself (its modules' modes, BatchNorm statistics) is never touched."""
    correct = 0
    model_eval = model_copy(model, training=False)
    for s in range(0, x.shape[0], batch_size):
        pred = mx.argmax(model_eval(x[s : s + batch_size]), axis=-1)
        correct += int(mx.sum(pred == y[s : s + batch_size]).item())
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
    noise_std: float = 0.0,
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy (the mlx-examples loop, compiled).

    ``noise_std`` > 0 adds N(0, noise_std^2) noise to every training batch (Gaussian data
    augmentation, unclipped): the base classifier of randomized smoothing is trained with the noise
    level it is certified at (Cohen, Rosenfeld & Kolter 2019, https://arxiv.org/abs/1902.02918).
    The noise comes from explicit keys derived from ``seed`` (an input of the compiled step, so
    every batch gets a fresh draw and runs are repeatable).
    """
    if (
        isinstance(noise_std, bool)
        or not isinstance(noise_std, (int, float, np.floating, np.integer))
        or not math.isfinite(noise_std)
        or noise_std < 0
    ):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
    noise_std = float(noise_std)
    optimizer = optim.Adam(learning_rate=learning_rate)

    def loss_fn(model, xb, yb):
        return nn.losses.cross_entropy(model(xb), yb, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    def step(xb, yb):
        loss, grads = loss_and_grad(model, xb, yb)
        optimizer.update(model, grads)
        return loss

    if noise_std > 0:
        clean_step = step

        def step(xb, yb, key):
            return clean_step(xb + mx.random.normal(xb.shape, dtype=xb.dtype, scale=noise_std, key=key), yb)

    step = mx.compile(step, inputs=state, outputs=state)
    epoch_keys = mx.random.split(mx.random.key(seed), max(epochs, 1)) if noise_std > 0 else None
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    epochs_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs_iter = tqdm(epochs_iter, desc=progress, unit="epoch", leave=False)
    model.train()
    starts = range(0, n - batch_size + 1, batch_size)
    for epoch in epochs_iter:
        order = mx.array(rng.permutation(n))
        batch_keys = mx.random.split(epoch_keys[epoch], max(len(starts), 1)) if noise_std > 0 else None
        # Full batches only, so the compiled step sees one shape.
        for j, s in enumerate(starts):
            idx = order[s : s + batch_size]
            if batch_keys is None:
                step(x[idx], y[idx])
            else:
                step(x[idx], y[idx], batch_keys[j])
            mx.eval(state)
    model.eval()
    return model
