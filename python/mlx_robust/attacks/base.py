"""What every attack shares: the result type, the base class and argument checks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import mlx.core as mx

from mlx_robust._checks import (  # noqa: F401  (re-exported: the attacks' old import path)
    FLOAT32_MAX,
    NORMS,
    EpsLike,
    check_choice,
    check_int,
    check_positive,
    finite32,
    float32_note,
    is_int,
    per_sample,
    scalar,
)

if TYPE_CHECKING:  # pragma: no cover
    from mlx_robust.robust_model import RobustModel

__all__ = [
    "Attack", "AttackResult", "EpsLike", "FLOAT32_MAX", "NORMS", "check_positive", "finite32", "float32_note",
    "is_int", "merge_results", "per_sample", "scalar",
]


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


def merge_results(parts: Sequence[AttackResult], **fields: object) -> AttackResult:
    """One result from the results of consecutive slices of a batch, field by field: per-sample
    arrays are concatenated, a field that is None in every part stays None, the rest (the attack's
    name, its EOT draws) come from the first part; ``fields`` override any field by name. The
    result has the parts' type, so an attack's extra fields (``SquareResult.queries``) survive."""
    merged = {}
    for f in dataclasses.fields(parts[0]):
        values = [getattr(p, f.name) for p in parts]
        if all(v is None for v in values):
            merged[f.name] = None
        elif isinstance(values[0], mx.array):
            merged[f.name] = mx.concatenate(values, axis=0)
        else:
            merged[f.name] = values[0]
    merged.update(fields)
    return type(parts[0])(**merged)


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

    def __post_init__(self) -> None:
        """Check the settings attacks share, once: ``eps``, ``steps``, ``restarts`` and ``norm``
        first, then the attack's own (:meth:`_check_settings`), then ``unroll`` and
        ``eot_samples``; each only where the attack has that field."""
        fields = {f.name for f in dataclasses.fields(self)}
        if "eps" in fields:
            object.__setattr__(self, "eps", check_positive(self.eps, "eps", allow_zero=True))
        for name in ("steps", "restarts"):
            if name in fields:
                object.__setattr__(self, name, check_int(getattr(self, name), name))
        if "norm" in fields:
            check_choice(self.norm, "norm", NORMS)
        self._check_settings()
        for name in ("unroll", "eot_samples"):
            if name in fields:
                check_int(getattr(self, name), name, optional=True)

    def _check_settings(self) -> None:
        """Check (and normalise, with ``object.__setattr__``) the settings only this attack has."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def run(self, robust: "RobustModel", x: mx.array, y: mx.array, y_target: Optional[mx.array],
            key: mx.array, rows: Optional[mx.array] = None) -> AttackResult:
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


