"""Gradient attacks on the C++ compiled loop: PGD (L-inf / L2) and FGSM.

Every attack here is one configuration of a single loop (``csrc/attack.h``): optional random start,
``steps`` ascent steps on a per-sample objective, projection onto the eps-ball and the input
bounds, restarts, and per sample the strongest example found (first success, else highest loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from mlx_robust.model import RobustModel

EpsLike = Union[float, Sequence[float], np.ndarray, mx.array]

_NORMS = ("linf", "l2")
_LOSSES = ("ce", "margin", "kl")


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


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _scalar(v: object) -> Optional[float]:
    """A Python/numpy/MLX number (0-d) as float, else None (a per-sample vector)."""
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"expected a number, got {v!r}")
    if isinstance(v, (int, float, np.number)):
        return float(v)
    if isinstance(v, (mx.array, np.ndarray)) and v.ndim == 0:
        return float(v.item())
    return None


def _check_positive(value: object, name: str, allow_zero: bool) -> object:
    """Validate a scalar or per-sample (N,) setting; returns it with scalars as float."""
    op = ">= 0" if allow_zero else "> 0"
    bad = (lambda a: a < 0) if allow_zero else (lambda a: a <= 0)
    s = _scalar(value)
    if s is not None:
        if not math.isfinite(s) or bad(s):
            raise ValueError(f"{name} must be a finite number {op}, got {s}")
        return s
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a number or a per-sample vector of shape (N,)") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a number or a per-sample vector of shape (N,), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(bad(arr)):
        every = "finite and >= 0" if allow_zero else "> 0 and finite"
        raise ValueError(f"{name} must be {every} for every sample")
    return value


def per_sample(value: EpsLike, n: int, name: str) -> mx.array:
    """A scalar or (N,) vector as an (N,) float32 array; ValueError naming ``name`` otherwise."""
    s = _scalar(value)
    if s is not None:
        return mx.full((n,), s, dtype=mx.float32)
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a number or have shape ({n},) (one per sample), got shape {arr.shape}")
    return mx.array(arr)


@dataclass(frozen=True)
class PGD:
    """Projected gradient descent (Madry et al. 2018, "Towards Deep Learning Models Resistant to
    Adversarial Attacks", https://arxiv.org/abs/1706.06083).

    Maximises the per-sample loss within an L-inf or L2 ball of radius ``eps``::

        x_{t+1} = Proj_{B(x, eps) ∩ [lo, hi]}( x_t + step_size * sign(∇ L) )         (linf)
        x_{t+1} = Proj_{B(x, eps) ∩ [lo, hi]}( x_t + step_size * ∇ L / ||∇ L||_2 )    (l2)

    Args:
        eps: radius, a number or one per sample (shape (N,)). eps=0 returns the inputs.
        steps: ascent steps (>= 1).
        step_size: per-step size; default 2.5 * eps / steps (Madry et al.).
        norm: "linf" or "l2".
        random_start: start uniformly inside the ball (from the call's ``key``).
        restarts: independent random starts; per sample the strongest result is kept.
        loss: "ce" (cross-entropy), "margin" (Carlini-Wagner margin on logits) or "kl"
            (KL divergence from the clean prediction: TRADES' inner attack, Zhang et al. 2019).
        early_stop: samples already misclassified leave the batch (faster; same result).
        unroll: steps per compiled call; None picks it by timing one step.
        eot_samples: draws of a random defence averaged per step (EOT, Athalye et al. 2018);
            None uses the defence's own default (1 for a deterministic model).

    Example:
        >>> res = robust.attack(x, y, mr.PGD(eps=0.3, steps=40, step_size=0.01), key=mr.key(0))
        >>> res.robust_accuracy
    """

    eps: EpsLike = 0.3
    steps: int = 40
    step_size: Optional[EpsLike] = None
    norm: str = "linf"
    random_start: bool = True
    restarts: int = 1
    loss: str = "ce"
    early_stop: bool = True
    unroll: Optional[int] = None
    eot_samples: Optional[int] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", _check_positive(self.eps, "eps", allow_zero=True))
        if self.step_size is not None:
            object.__setattr__(self, "step_size", _check_positive(self.step_size, "step_size", allow_zero=False))
        if not _is_int(self.steps) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not _is_int(self.restarts) or self.restarts < 1:
            raise ValueError(f"restarts must be an integer >= 1, got {self.restarts!r}")
        if self.norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {self.norm!r}")
        if self.loss not in _LOSSES:
            raise ValueError(f"loss must be one of {_LOSSES}, got {self.loss!r}")
        if self.unroll is not None and (not _is_int(self.unroll) or self.unroll < 1):
            raise ValueError(f"unroll must be None or an integer >= 1, got {self.unroll!r}")
        if self.eot_samples is not None and (not _is_int(self.eot_samples) or self.eot_samples < 1):
            raise ValueError(f"eot_samples must be None or an integer >= 1, got {self.eot_samples!r}")
        object.__setattr__(self, "steps", int(self.steps))
        object.__setattr__(self, "restarts", int(self.restarts))

    @property
    def name(self) -> str:
        return f"PGD-{self.steps} {self.norm}"

    def step_sizes(self, eps: mx.array) -> mx.array:
        """Per-sample step sizes (N,) for per-sample radii ``eps``."""
        n = eps.shape[0]
        if self.step_size is None:
            return eps * (2.5 / self.steps)
        return per_sample(self.step_size, n, "step_size")

    def run(
        self,
        robust: "RobustModel",
        x: mx.array,
        y: mx.array,
        y_target: Optional[mx.array],
        key: mx.array,
        training: bool = False,
        track_best: bool = True,
    ) -> AttackResult:
        """Attack a validated batch (called by ``RobustModel.attack``)."""
        n = x.shape[0]
        eps = per_sample(self.eps, n, "eps")
        targeted = y_target is not None
        eot = robust.eot_samples(self.eot_samples)
        probs = robust.clean_probabilities(x) if self.loss == "kl" else None
        x_adv, success, loss, logits, norms = robust._fn.run_attack(
            x,
            y_target if targeted else y,
            eps,
            self.step_sizes(eps),
            robust.bounds,
            num_classes=robust.num_classes,
            norm=self.norm,
            loss=self.loss,
            steps=self.steps,
            restarts=self.restarts,
            random_start=self.random_start,
            targeted=targeted,
            track_best=track_best,
            early_stop=self.early_stop and track_best,
            unroll=int(self.unroll or 0),
            key=key,
            eot_samples=eot,
            probs=probs,
            training=training,
        )
        name = self.name if eot == 1 else f"{self.name} EOT-{eot}"
        return AttackResult(x_adv, success, norms, logits, loss, y, y_target, name, eot)


@dataclass(frozen=True)
class FGSM(PGD):
    """Fast gradient sign method (Goodfellow, Shlens & Szegedy 2015, "Explaining and Harnessing
    Adversarial Examples", https://arxiv.org/abs/1412.6572): one step of size eps,
    ``x + eps * sign(∇ L)`` (L-inf), or ``x + eps * ∇ L / ||∇ L||_2`` with ``norm="l2"`` (the fast
    gradient method), clipped to the input bounds. The one-step case of :class:`PGD`.

    Args:
        eps: radius, a number or one per sample (shape (N,)).
        norm: "linf" (FGSM) or "l2" (FGM).
        loss: "ce" or "margin".

    Example:
        >>> res = robust.attack(x, y, mr.FGSM(eps=0.1))
    """

    eps: EpsLike = 0.1
    steps: int = 1
    step_size: Optional[EpsLike] = None
    random_start: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps != 1 or self.restarts != 1 or self.random_start:
            raise ValueError("FGSM is a single step from x: use PGD for steps, restarts or random starts")

    @property
    def name(self) -> str:
        return "FGSM" if self.norm == "linf" else "FGM l2"

    def step_sizes(self, eps: mx.array) -> mx.array:
        return eps if self.step_size is None else super().step_sizes(eps)


Attack = PGD
