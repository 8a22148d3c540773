"""The one bridge to the C++ core.

Turns an ``nn.Module`` into a pure function of ``(params, x)``, owns the compiled objects, and
saves/restores the model's parameters and train/eval mode around every call into C++.
Nothing else in the package imports ``_core``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_robust import _core

ValidationReport = _core.ValidationReport


def check_batch_structure(x: mx.array, sample_shape: Optional[Sequence[int]], name: str) -> None:
    """Rank, batch size, dtype and per-sample shape of ``x`` (reads no data)."""
    _core.check_batch_structure(x, None if sample_shape is None else list(sample_shape), name)


def validate_batch(
    x: mx.array, sample_shape: Optional[Sequence[int]], lo: float, hi: float, name: str
) -> ValidationReport:
    """One fused C++ pass: structure, NaN/Inf and out-of-range counts per sample."""
    return _core.validate_batch(
        x,
        None if sample_shape is None else list(sample_shape),
        lo=mx.array(lo, mx.float32),
        hi=mx.array(hi, mx.float32),
        name=name,
    )


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for _, m in model.named_modules()]


@contextmanager
def preserved(model: nn.Module, training: Optional[bool] = None) -> Iterator[None]:
    """Run a block with the model's parameters and per-module train/eval flags restored after.

    ``training`` (if not None) sets the mode for the block. Restores also when the block raises,
    including when MLX left placeholder arrays in the module after a failed trace.
    """
    params = tree_flatten(model.parameters())
    modes = _module_modes(model)
    try:
        if training is not None:
            model.train(training)
        yield
    finally:
        model.update(tree_unflatten(params))
        for module, mode in modes:
            # Module.train() sets every submodule; restore each one's own flag.
            module._training = mode


class ModelFunction:
    """An ``nn.Module`` seen as ``f(params, x) -> logits``, plus its C++ attack engine.

    The engine's compiled steps take the flattened parameters as inputs, so an optimizer update
    between calls is always seen (never baked in as constants).
    """

    def __init__(self, model: nn.Module, transform: Optional[Callable[[mx.array, mx.array], mx.array]] = None) -> None:
        self.model = model
        # A random input transform (a defence) applied before the model: transform(x, key).
        self.transform = transform
        self.engine = _core.AttackEngine()

    def flat_parameters(self) -> tuple[list[str], list[mx.array]]:
        flat = tree_flatten(self.model.parameters())
        return [k for k, _ in flat], [v for _, v in flat]

    @property
    def stochastic(self) -> bool:
        return self.transform is not None

    def _forward(self, names: list[str], originals: list[mx.array]) -> Callable:
        model, transform = self.model, self.transform

        def forward(params: list[mx.array], x: mx.array) -> mx.array:
            if transform is not None:
                # The engine appends the draw's key to the parameters of a stochastic model.
                *params, key = params
                x = transform(x, key)
            model.update(tree_unflatten(list(zip(names, params))))
            try:
                return model(x)
            finally:
                model.update(tree_unflatten(list(zip(names, originals))))

        return forward

    @property
    def trace_count(self) -> int:
        return self.engine.trace_count

    def chosen_unroll(self, shape: Sequence[int]) -> int:
        return self.engine.chosen_unroll(list(shape))

    def clear(self) -> None:
        self.engine.clear()

    def run_attack(
        self,
        x: mx.array,
        y: mx.array,
        eps: mx.array,
        step_size: mx.array,
        bounds: tuple[float, float],
        *,
        num_classes: int,
        norm: str,
        loss: str,
        steps: int,
        restarts: int,
        random_start: bool,
        targeted: bool,
        track_best: bool,
        early_stop: bool,
        unroll: int,
        key: mx.array,
        eot_samples: int = 1,
        probs: Optional[mx.array] = None,
        training: bool = False,
    ) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array]:
        """Run the compiled attack loop; returns (x_adv, success, loss, logits, norms).

        ``probs`` (N, C): clean probabilities, needed by ``loss="kl"`` (TRADES' inner attack).
        ``training`` is the mode the model runs in during the attack (eval by default).
        """
        names, params = self.flat_parameters()
        forward = self._forward(names, params)
        with preserved(self.model, training=training):
            try:
                return self.engine.run(
                    forward,
                    params,
                    x,
                    y,
                    eps,
                    step_size,
                    mx.array(bounds[0], mx.float32),
                    mx.array(bounds[1], mx.float32),
                    num_classes=num_classes,
                    norm=norm,
                    loss=loss,
                    steps=steps,
                    restarts=restarts,
                    random_start=random_start,
                    targeted=targeted,
                    track_best=track_best,
                    early_stop=early_stop,
                    unroll=unroll,
                    stochastic=self.stochastic,
                    eot_samples=eot_samples,
                    key=key,
                    probs=probs,
                )
            except Exception:
                # The engine dropped its compiled entries; make the next call start clean too.
                self.engine.clear()
                raise
