"""What every attack shares: the result type, the base class and argument checks."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from mlx_robust.model import RobustModel

EpsLike = Union[float, Sequence[float], np.ndarray, mx.array]

NORMS = ("linf", "l2")


@dataclass(frozen=True)
class AttackResult:
    """What an attack returns, per sample.

    Attributes:
        x_adv: adversarial inputs, same shape and dtype as the clean inputs.
        success: (N,) bool. Untargeted: the model's prediction on ``x_adv`` differs from ``y``;
            targeted: it equals ``y_target``. A sample misclassified already counts as a success.
        norms: (N,) float32 perturbation size ``||x_adv - x||`` in the attack's norm.
        logits: (N, C) float32 model logits on ``x_adv``.
        loss: (N,) float32 attack objective at ``x_adv`` (higher = stronger).
        y: (N,) int32 labels attacked (the model's own predictions if none were given).
        y_target: (N,) int32 targets of a targeted attack, else None.
        attack: a short description of the attack that produced this result.
        eot_samples: random draws averaged per step (> 1: EOT against a random defence); the
            logits and success then refer to the mean logits over that many draws.
    """

    x_adv: mx.array
    success: mx.array
    norms: mx.array
    logits: mx.array
    loss: mx.array
    y: mx.array
    y_target: Optional[mx.array]
    attack: str
    eot_samples: int = 1

    @property
    def predictions(self) -> mx.array:
        """(N,) int32 model predictions on ``x_adv``."""
        return mx.argmax(self.logits, axis=-1).astype(mx.int32)

    @property
    def success_rate(self) -> float:
        """Fraction of samples on which the attack succeeded."""
        return float(mx.mean(self.success.astype(mx.float32)).item())

    @property
    def robust_accuracy(self) -> float:
        """Fraction of samples still classified as ``y`` on ``x_adv``."""
        return float(mx.mean((self.predictions == self.y).astype(mx.float32)).item())


def is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def scalar(v: object) -> Optional[float]:
    """A Python/numpy/MLX number (0-d) as float, else None (a per-sample vector)."""
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"expected a number, got {v!r}")
    if isinstance(v, (int, float, np.number)):
        return float(v)
    if isinstance(v, (mx.array, np.ndarray)) and v.ndim == 0:
        return float(v.item())
    return None


FLOAT32_MAX = float(np.finfo(np.float32).max)


def finite32(value: float) -> bool:
    """Whether ``value`` is finite and stays finite as float32 (the attacks compute in float32:
    1e39 is finite in float64 but infinite in float32)."""
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def float32_note(value: float) -> str:
    """What to add to a "must be a finite number" error for a value only float32 overflows."""
    if math.isfinite(value) and not finite32(value):
        return f" (infinite in float32, whose largest value is {FLOAT32_MAX:.8g})"
    return ""


def check_positive(value: object, name: str, allow_zero: bool) -> object:
    """Validate a scalar or per-sample (N,) setting; returns it with scalars as float."""
    op = ">= 0" if allow_zero else "> 0"
    bad = (lambda a: a < 0) if allow_zero else (lambda a: a <= 0)
    s = scalar(value)
    if s is not None:
        if not finite32(s) or bad(s):
            raise ValueError(f"{name} must be a finite number {op}, got {s}{float32_note(s)}")
        return s
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a number or a per-sample vector of shape (N,)") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a number or a per-sample vector of shape (N,), got shape {arr.shape}")
    if not np.all(np.isfinite(arr) & (np.abs(arr) <= FLOAT32_MAX)) or np.any(bad(arr)):
        every = "finite and >= 0" if allow_zero else "> 0 and finite"
        raise ValueError(
            f"{name} must be {every} for every sample (finite in float32: at most {FLOAT32_MAX:.8g})"
        )
    return value


def per_sample(value: EpsLike, n: int, name: str) -> mx.array:
    """A scalar or (N,) vector as an (N,) float32 array; ValueError naming ``name`` otherwise."""
    s = scalar(value)
    if s is not None:
        return mx.full((n,), s, dtype=mx.float32)
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a number or have shape ({n},) (one per sample), got shape {arr.shape}")
    return mx.array(arr)


class Attack:
    """Base of every attack configuration (frozen dataclasses holding settings only).

    Subclasses implement ``run(robust, x, y, y_target, key, rows=None)`` on a validated batch and
    return an :class:`AttackResult`; ``RobustModel.attack`` validates inputs, slices per-sample
    settings named in ``per_sample_fields`` with the batch, and restores the model afterwards.
    ``rows`` (N,) are the samples' global indices in the caller's batch: a random defence's draws
    are keyed per sample by them (default 0..N-1). ``result_loss`` recomputes the result's ``loss``
    from logits (used where the returned array differs from the attacked one: low precision).
    """

    per_sample_fields: tuple[str, ...] = ("eps",)

    @property
    def name(self) -> str:
        return type(self).__name__

    def run(
        self,
        robust: "RobustModel",
        x: mx.array,
        y: mx.array,
        y_target: Optional[mx.array],
        key: mx.array,
        rows: Optional[mx.array] = None,
    ) -> AttackResult:
        raise NotImplementedError

    def result_loss(
        self,
        robust: "RobustModel",
        x: mx.array,
        logits: mx.array,
        y: mx.array,
        y_target: Optional[mx.array],
        rows: Optional[mx.array] = None,
        key: Optional[mx.array] = None,
    ) -> mx.array:
        """The result's ``loss`` (N,) float32 at ``logits`` (N, C): this attack's own objective.

        ``x`` are the clean inputs (for objectives that depend on the clean prediction).
        """
        raise NotImplementedError


