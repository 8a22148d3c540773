"""PGD (L-inf / L2) and FGSM on the C++ compiled loop.

Both are configurations of one loop (``csrc/attack.h``): optional random start, ``steps`` ascent
steps on a per-sample objective, projection onto the eps-ball and the input bounds, restarts, and
per sample the strongest example found: within a restart the first successful iterate, else the
last iterate (as in Madry et al.); over restarts the first success, else the highest loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import mlx.core as mx

from mlx_robust import _functional
from mlx_robust._checks import EpsLike, check_choice, check_positive, per_sample
from mlx_robust.attacks.base import Attack, AttackResult

if TYPE_CHECKING:  # pragma: no cover
    from mlx_robust.robust_model import RobustModel

LOSSES = ("ce", "margin", "kl")


@dataclass(frozen=True)
class PGD(Attack):
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

    per_sample_fields = ("eps", "step_size")

    def _check_settings(self) -> None:
        if self.step_size is not None:
            object.__setattr__(self, "step_size", check_positive(self.step_size, "step_size", allow_zero=False))
        check_choice(self.loss, "loss", LOSSES)

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
        rows: Optional[mx.array] = None,
    ) -> AttackResult:
        """Attack a validated batch (called by ``RobustModel.attack``)."""
        n = x.shape[0]
        eps = per_sample(self.eps, n, "eps")
        targeted = y_target is not None
        eot = robust.eot_samples(self.eot_samples)
        probs = robust.clean_probabilities(x) if self.loss == "kl" else None
        x_adv, success, loss, logits, norms = robust.engine.run_attack(
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
            rows=rows,
        )
        name = self.name if eot == 1 else f"{self.name} EOT-{eot}"
        return AttackResult(
            x_adv=x_adv, success=success, norms=norms, logits=logits, loss=loss, y=y, y_target=y_target, attack=name, eot_samples=eot,
        )

    def result_loss(self, robust, x, logits, y, y_target, rows=None, key=None) -> mx.array:
        """The objective the attack maximised (``loss``: ce, margin or kl; targeted: negated)."""
        targeted = y_target is not None
        probs = robust.clean_probabilities(x) if self.loss == "kl" else None
        return _functional.attack_objective(logits, y_target if targeted else y, self.loss, targeted, probs)


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

    def _check_settings(self) -> None:
        super()._check_settings()
        if self.steps != 1 or self.restarts != 1 or self.random_start:
            raise ValueError("FGSM is a single step from x: use PGD for steps, restarts or random starts")

    @property
    def name(self) -> str:
        return "FGSM" if self.norm == "linf" else "FGM l2"

    def step_sizes(self, eps: mx.array) -> mx.array:
        return eps if self.step_size is None else super().step_sizes(eps)
