"""Attacks: configurations run by ``RobustModel.attack`` on the C++ core."""

from mlx_robust.attacks.base import Attack, AttackResult, EpsLike, per_sample
from mlx_robust.attacks.pgd import FGSM, PGD

__all__ = ["FGSM", "PGD", "Attack", "AttackResult", "EpsLike", "per_sample"]
