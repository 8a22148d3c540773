"""Auto-PGD: APGD-CE, APGD-DLR and APGD-T on the C++ compiled loop (``csrc/apgd.h``).

Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", https://arxiv.org/abs/2003.01690.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import mlx.core as mx

from mlx_robust import _functional
from mlx_robust._checks import EpsLike, check_choice, check_fraction, check_int, per_sample
from mlx_robust.attacks.base import Attack, AttackResult

if TYPE_CHECKING:  # pragma: no cover
    from mlx_robust.robust_model import RobustModel

APGD_LOSSES = ("ce", "dlr")


@dataclass(frozen=True)
class APGD(Attack):
    """Auto-PGD (Croce & Hein 2020, https://arxiv.org/abs/2003.01690), L-inf or L2.

    PGD without a step-size parameter: from a random point on the eps-sphere, step size
    ``eta = 2 eps``, momentum 0.75::

        z       = P(x_k + eta * sign(∇f(x_k)))                  (l2: ∇f / ||∇f||_2)
        x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))

    with ``P`` the projection onto the eps-ball and the input bounds. At the checkpoints
    ``w_j ≈ p_j steps``, ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``
    (integer interval lengths as in the authors' code: 22, 19, 16, ... 6 for 100 steps), the step
    size is halved and the iterate reset to the best point so far when (1) fewer than ``rho`` of the
    steps since the last checkpoint increased ``f``, or (2) neither the step size nor the best ``f``
    changed since the last checkpoint. ``f`` is the cross-entropy ("ce", APGD-CE) or
    the Difference of Logits Ratio ("dlr", APGD-DLR, ``-(z_y - max_{i≠y} z_i) / (z_π1 - z_π3)``,
    invariant to shifts and scales of the logits; needs >= 3 classes).

    Per sample the result is the first successful iterate, else the highest-objective one; samples
    misclassified already are returned unchanged. With ``y_target`` the attack is targeted
    (``-CE(z, t)`` or the targeted DLR; success = predicted as the target). The checkpoint logic runs
    inside the compiled steps: no Python runs per step after the first trace.

    Args:
        eps: radius, a number or one per sample (shape (N,)). eps=0 returns the inputs.
        steps: iterations per run (>= 1).
        norm: "linf" or "l2".
        loss: "ce" or "dlr".
        restarts: runs from independent random starts; later runs attack only samples not yet broken.
        rho: condition (1)'s threshold on the fraction of steps that increased the objective.
        early_stop: samples already broken leave the batch (faster; same result).
        unroll: steps per compiled call; None picks it by timing one step.
        eot_samples: draws of a random defence averaged per step (EOT); None uses the defence's default.

    Example:
        >>> res = robust.attack(x, y, mr.APGD(eps=0.1, steps=100, loss="dlr"), key=mr.key(0))
        >>> res.robust_accuracy
    """

    eps: EpsLike = 0.3
    steps: int = 100
    norm: str = "linf"
    loss: str = "ce"
    restarts: int = 1
    rho: float = 0.75
    early_stop: bool = True
    unroll: Optional[int] = None
    eot_samples: Optional[int] = None

    per_sample_fields = ("eps",)

    def _check_settings(self) -> None:
        check_choice(self.loss, "loss", APGD_LOSSES)
        object.__setattr__(self, "rho", check_fraction(self.rho, "rho"))

    @property
    def name(self) -> str:
        return f"APGD-{self.loss.upper()}-{self.steps} {self.norm}"

    def _n_target_classes(self, num_classes: int) -> int:
        return 0

    def run(self, robust: "RobustModel", x: mx.array, y: mx.array, y_target: Optional[mx.array],
            key: mx.array, rows: Optional[mx.array] = None) -> AttackResult:
        """Attack a validated batch (called by ``RobustModel.attack``)."""
        n = x.shape[0]
        eps = per_sample(self.eps, n, "eps")
        eot = robust.eot_samples(self.eot_samples)
        num_classes = robust.num_classes
        x_adv, success, loss, logits, norms = robust.engine.run_apgd(
            x,
            y,
            eps,
            robust.bounds,
            num_classes=num_classes,
            norm=self.norm,
            loss=self.loss,
            steps=self.steps,
            restarts=self.restarts,
            n_target_classes=0 if y_target is not None else self._n_target_classes(num_classes),
            target=y_target,
            rho=self.rho,
            early_stop=self.early_stop,
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
        """The objective APGD maximised at ``logits``: CE or DLR (targeted: towards ``y_target``).

        APGD-T (no ``y_target``): the best over its target classes (the 2nd, 3rd, ... classes of
        the clean prediction), as its result keeps the best run.
        """
        n_targets = 0 if y_target is not None else self._n_target_classes(robust.num_classes)
        if y_target is not None:
            targets = [y_target]
        elif n_targets > 0:
            clean = robust.defended_logits(x, key, rows, robust.eot_samples(self.eot_samples))
            ranked = mx.argsort(clean, axis=-1).astype(mx.int32)
            c = robust.num_classes
            targets = [ranked[:, c - 2 - t] for t in range(n_targets)]
        else:
            targets = [None]
        losses = []
        for t in targets:
            if self.loss == "ce":
                losses.append(_functional.attack_objective(logits, y if t is None else t, "ce", t is not None))
            else:
                losses.append(_functional.dlr_loss(logits, y, t))
        return losses[0] if len(losses) == 1 else mx.max(mx.stack(losses), axis=0)


@dataclass(frozen=True)
class APGDT(APGD):
    """Targeted Auto-PGD, APGD-T (Croce & Hein 2020, §3.2, https://arxiv.org/abs/2003.01690).

    An untargeted attack run as ``n_target_classes`` targeted APGD runs, one per target class:
    the 2nd, 3rd, ... most likely classes of the clean prediction. Each run maximises the targeted
    DLR loss ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)`` (needs >= 4 classes) and only attacks
    the samples that earlier runs did not break; per sample the first success is kept
    (success = prediction differs from ``y``). With ``y_target`` given, it is a plain targeted APGD
    towards those targets.

    Args:
        eps: radius, a number or one per sample (shape (N,)).
        steps: iterations per run (>= 1).
        norm: "linf" or "l2".
        n_target_classes: target classes tried per sample, 1 <= n_target_classes <= num_classes - 1.
        restarts: runs per target class.
        loss: "dlr" (the targeted DLR, as in the paper) or "ce" (``-CE(z, t)``).
        rho, early_stop, unroll, eot_samples: as in :class:`APGD`.

    Example:
        >>> res = robust.attack(x, y, mr.APGDT(eps=0.1, steps=100, n_target_classes=9), key=mr.key(0))
    """

    loss: str = "dlr"
    n_target_classes: int = 9

    def _check_settings(self) -> None:
        super()._check_settings()
        object.__setattr__(self, "n_target_classes", check_int(self.n_target_classes, "n_target_classes"))

    @property
    def name(self) -> str:
        return f"APGD-T-{self.steps} {self.norm}"

    def _n_target_classes(self, num_classes: int) -> int:
        if self.n_target_classes > num_classes - 1:
            raise ValueError(
                f"n_target_classes must be <= num_classes - 1 = {num_classes - 1} "
                f"(other classes to target), got {self.n_target_classes}"
            )
        return self.n_target_classes

