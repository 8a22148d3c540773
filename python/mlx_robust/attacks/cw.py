"""Carlini & Wagner L2 on the C++ compiled Adam loop (``csrc/cw.h``).

Carlini & Wagner 2017, "Towards Evaluating the Robustness of Neural Networks",
https://arxiv.org/abs/1608.04644.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import mlx.core as mx

from mlx_robust import _functional
from mlx_robust._checks import check_flag, check_int, finite32, float32_note, scalar
from mlx_robust.attacks.base import Attack, AttackResult

if TYPE_CHECKING:  # pragma: no cover
    from mlx_robust.robust_model import RobustModel


def _number(value: object, name: str, allow_zero: bool) -> float:
    try:
        s = scalar(value)
    except TypeError:
        s = None
    op = ">= 0" if allow_zero else "> 0"
    if s is None or not finite32(s) or s < 0 or (s == 0 and not allow_zero):
        raise ValueError(
            f"{name} must be a finite number {op}, got {value!r}{'' if s is None else float32_note(s)}"
        )
    return s


@dataclass(frozen=True)
class CW(Attack):
    """Carlini & Wagner L2 attack (Carlini & Wagner 2017, https://arxiv.org/abs/1608.04644).

    A minimum-norm attack: no eps, it looks per sample for the smallest L2 perturbation that
    changes the prediction. With the change of variables
    ``x' = lo + (hi - lo) (tanh(w) + 1) / 2`` (so ``x'`` always lies in the bounds), Adam on ``w``
    minimises::

        ||x' - x||_2^2 + c * f(x'),    f(x') = max(Z_y(x') - max_{j≠y} Z_j(x'), -kappa)

    (targeted: ``f = max(max_{j≠t} Z_j - Z_t, -kappa)``), with ``Z`` the logits. After each round of
    ``steps`` Adam steps a binary search updates ``c`` per sample (halving towards the largest
    failing c once one succeeded, else x10); each round restarts Adam from ``x``.

    Returns per sample the smallest-L2 ``x'`` whose logit margin reached ``kappa`` (success), or
    ``x`` itself when none was found (success only if ``x`` is already misclassified). ``norms`` are
    L2 norms; ``loss`` is the logit margin ``max_{j≠y} Z_j - Z_y`` at ``x_adv`` (higher = stronger).

    Args:
        c: initial trade-off constant (> 0) of every sample (``initial_const`` in the authors' code).
        kappa: confidence (>= 0): the margin success must reach.
        steps: Adam steps per binary-search round (>= 1).
        lr: Adam learning rate (betas 0.9 and 0.999, epsilon 1e-8).
        binary_search_steps: rounds of the binary search over c (>= 1); with >= 10 the last round
            uses the smallest successful c (the authors' repeat).
        early_abort: a sample stops its round when its objective did not drop by 0.01% over
            ``steps // 10`` steps.
        unroll: steps per compiled call; None picks it by timing one step.
        eot_samples: draws of a random defence averaged per step (EOT); None uses the defence's default.

    Example:
        >>> res = robust.attack(x, y, mr.CW(c=1.0, steps=100), key=mr.key(0))
        >>> res.norms  # L2 size of each adversarial perturbation
    """

    c: float = 1.0
    kappa: float = 0.0
    steps: int = 100
    lr: float = 0.01
    binary_search_steps: int = 5
    early_abort: bool = True
    unroll: Optional[int] = None
    eot_samples: Optional[int] = None

    per_sample_fields = ()

    def _check_settings(self) -> None:
        object.__setattr__(self, "c", _number(self.c, "c", allow_zero=False))
        object.__setattr__(self, "kappa", _number(self.kappa, "kappa", allow_zero=True))
        object.__setattr__(self, "lr", _number(self.lr, "lr", allow_zero=False))
        object.__setattr__(self, "binary_search_steps", check_int(self.binary_search_steps, "binary_search_steps"))
        check_flag(self.early_abort, "early_abort")

    @property
    def norm(self) -> str:
        """The norm of the reported perturbation sizes: always "l2"."""
        return "l2"

    @property
    def name(self) -> str:
        return f"CW-L2-{self.steps}x{self.binary_search_steps}"

    def run(self, robust: "RobustModel", x: mx.array, y: mx.array, y_target: Optional[mx.array],
            key: mx.array, rows: Optional[mx.array] = None) -> AttackResult:
        """Attack a validated batch (called by ``RobustModel.attack``)."""
        targeted = y_target is not None
        eot = robust.eot_samples(self.eot_samples)
        x_adv, success, loss, logits, norms = robust.engine.run_cw(
            x,
            y_target if targeted else y,
            robust.bounds,
            num_classes=robust.num_classes,
            targeted=targeted,
            c=self.c,
            kappa=self.kappa,
            steps=self.steps,
            lr=self.lr,
            binary_search_steps=self.binary_search_steps,
            early_abort=self.early_abort,
            unroll=int(self.unroll or 0),
            key=key,
            eot_samples=eot,
            rows=rows,
        )
        name = self.name if eot == 1 else f"{self.name} EOT-{eot}"
        return AttackResult(
            x_adv=x_adv, success=success, norms=norms, logits=logits, loss=loss, y=y, y_target=y_target, attack=name, eot_samples=eot,
        )

    def result_loss(self, robust, x, logits, y, y_target, rows=None, key=None) -> mx.array:
        """The logit margin ``max_{j≠y} Z_j - Z_y`` (targeted: ``Z_t - max_{j≠t} Z_j``)."""
        targeted = y_target is not None
        return _functional.attack_objective(logits, y_target if targeted else y, "margin", targeted)
