"""The Square attack: score-based black-box random search, compiled in the C++ core.

Andriushchenko, Croce, Flammarion & Hein 2020, "Square Attack: a query-efficient black-box
adversarial attack via random search", https://arxiv.org/abs/1912.00049. It only reads the
model's logits, never its gradient, so it is the standard check for gradient masking: a defence
that stops PGD but not Square is obfuscating gradients, not robust.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import mlx.core as mx

from mlx_robust import _functional
from mlx_robust._checks import EpsLike, check_choice, check_flag, check_fraction, check_int, per_sample
from mlx_robust.attacks.base import Attack, AttackResult

if TYPE_CHECKING:  # pragma: no cover
    from mlx_robust.robust_model import RobustModel

LOSSES = ("margin", "ce")


@dataclass(frozen=True)
class SquareResult(AttackResult):
    """An :class:`AttackResult` plus the queries the Square attack spent per sample.

    Attributes:
        queries: (N,) int32 model queries per sample after the clean check: 0 for a sample
            misclassified already, else 1 (initialisation) + the iterations until success, at most
            ``n_queries``.
    """

    queries: Optional[mx.array] = None


@dataclass(frozen=True)
class Square(Attack):
    """Square attack (Andriushchenko et al. 2020, https://arxiv.org/abs/1912.00049), L-inf or L2.

    Random search on NHWC images (N, H, W, C) that minimises the margin loss
    ``z_y - max_{j != y} z_j`` (targeted: ``max_{j != t} z_j - z_t``) from the logits alone:

    1. init: L-inf vertical stripes ``x + eps * rho`` (one sign per column and channel); L2 tiles of
       the centre-weighted pattern with random signs, scaled to ``||delta||_2 = eps``.
    2. for ``n_queries - 1`` iterations, per sample not yet misclassified: a random ``s x s`` window
       (all channels; ``s`` from the pixel fraction ``p``, the same for the whole batch at that
       iteration) gets a new perturbation. L-inf: ``x0 + eps * rho_c`` per channel (the paper's
       ``x + 2 eps rho`` projected back onto the ball), redrawn if it would change nothing; L2: a
       second window is cleared and the first set to its old content plus the pattern, rescaled
       so that ``||delta||_2`` stays ``eps``. The candidate is clipped to the bounds and kept if
       its loss is lower.
    3. ``p`` starts at ``p_init`` and halves after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and
       8000 of 10000 iterations (rescaled to ``n_queries``).

    Randomness: every draw of a sample depends only on ``key``, the iteration and the sample's
    own content, so a sample's result is the same alone, in any batch, at any position in it, and
    with any ``batch_size``, ``early_stop`` or ``unroll``. (Identical images in one batch receive
    identical draws.) Against a random defence (``RobustModel(noise=...)``) each query sees one
    draw of the noise, keyed by the iteration and the sample's index in the call's batch, so the
    result still depends only on ``key``, never on ``batch_size`` or ``early_stop``. Window positions range over the whole image, including the last
    row and column, which the official code's ``randint(0, h - s)`` excludes; the L2
    initialisation centres its tiles (the official offset ``(h - 5s) // 2`` equals this whenever
    ``h // s == 5``, e.g. 28 x 28, 32 x 32, 224 x 224).

    Args:
        eps: radius, a number or one per sample (shape (N,)). eps=0 returns the inputs.
        n_queries: model queries per sample (>= 1): one for the initialisation, then one per
            iteration; a sample stops once misclassified. The clean check is not counted.
        norm: "linf" or "l2".
        p_init: initial fraction of pixels in the window, in (0, 1]; the paper uses 0.05 (L-inf)
            and 0.1 (L2) on ImageNet and 0.8 for small images.
        loss: "margin" (default) or "ce" (cross-entropy, minimising ``log p_y``; targeted:
            ``-log p_t``). Success is always "misclassified" (targeted: "predicted as target").
        early_stop: succeeded samples leave the batch (faster; same result).
        unroll: iterations per compiled call; None picks it by timing the first call.

    Example:
        >>> res = robust.attack(x, y, mr.Square(eps=0.1, n_queries=1000), key=mr.key(0))
        >>> res.robust_accuracy, res.queries
    """

    eps: EpsLike
    n_queries: int = 1000
    norm: str = "linf"
    p_init: float = 0.8
    loss: str = "margin"
    early_stop: bool = True
    unroll: Optional[int] = None

    per_sample_fields = ("eps",)

    def _check_settings(self) -> None:
        object.__setattr__(self, "n_queries", check_int(self.n_queries, "n_queries"))
        object.__setattr__(self, "p_init", check_fraction(self.p_init, "p_init"))
        check_choice(self.loss, "loss", LOSSES)
        check_flag(self.early_stop, "early_stop")

    @property
    def name(self) -> str:
        return f"Square-{self.n_queries} {self.norm}"

    def run(self, robust: "RobustModel", x: mx.array, y: mx.array, y_target: Optional[mx.array],
            key: mx.array, rows: Optional[mx.array] = None) -> SquareResult:
        """Attack a validated batch (called by ``RobustModel.attack``)."""
        if x.ndim != 4:
            raise ValueError(
                f"Square needs a batch of NHWC images (N, H, W, C), got x of shape {tuple(x.shape)}"
            )
        n = x.shape[0]
        eps = per_sample(self.eps, n, "eps")
        targeted = y_target is not None
        x_adv, success, loss, logits, norms, queries = _functional.run_square(
            robust.engine,
            x,
            y_target if targeted else y,
            eps,
            robust.bounds,
            num_classes=robust.num_classes,
            norm=self.norm,
            loss=self.loss,
            n_queries=self.n_queries,
            p_init=self.p_init,
            targeted=targeted,
            early_stop=self.early_stop,
            unroll=int(self.unroll or 0),
            key=key,
            rows=rows,
        )
        return SquareResult(
            x_adv=x_adv, success=success, norms=norms, logits=logits, loss=loss, y=y, y_target=y_target,
            attack=self.name, eot_samples=1, queries=queries,
        )

    def result_loss(self, robust, x, logits, y, y_target, rows=None, key=None) -> mx.array:
        """The attack objective (``loss``: margin or ce; targeted: towards ``y_target``)."""
        targeted = y_target is not None
        return _functional.attack_objective(logits, y_target if targeted else y, self.loss, targeted)
