"""Attacks: configurations run by ``RobustModel.attack`` on the C++ core."""

from mlx_robust.attacks.apgd import APGD, APGDT
from mlx_robust.attacks.base import Attack, AttackResult, EpsLike, per_sample
from mlx_robust.attacks.cw import CW
from mlx_robust.attacks.pgd import FGSM, PGD
from mlx_robust.attacks.square import Square, SquareResult

__all__ = [
    "APGD",
    "APGDT",
    "CW",
    "FGSM",
    "PGD",
    "Square",
    "SquareResult",
    "Attack",
    "AttackResult",
    "EpsLike",
    "per_sample",
]
