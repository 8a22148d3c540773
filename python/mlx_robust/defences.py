"""Randomized input defences applied by RobustModel before the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from mlx_robust.attacks.base import finite32, float32_note


@dataclass(frozen=True)
class GaussianNoise:
    """Add N(0, std^2) noise to every input at inference ("random noise injection").

    A random defence: plain gradient attacks see one random draw per step and overrate it, so
    ``RobustModel.attack`` runs attacks against it with Expectation over Transformation (EOT,
    Athalye, Carlini & Wagner 2018, "Obfuscated Gradients Give a False Sense of Security",
    https://arxiv.org/abs/1802.00420): each step averages ``eot_samples`` draws. Noise is added in
    input space without clipping, as in randomized smoothing (Cohen et al. 2019).

    Args:
        std: noise standard deviation (> 0), in input units.
        eot_samples: draws per attack step used against this defence by default (>= 1).
    """

    std: float
    eot_samples: int = 10

    def __post_init__(self) -> None:
        if isinstance(self.std, bool) or not isinstance(self.std, (int, float)) or not finite32(self.std) or self.std <= 0:
            raise ValueError(f"std must be a finite number > 0, got {self.std!r}{float32_note(self.std)}")
        if isinstance(self.eot_samples, bool) or not isinstance(self.eot_samples, int) or self.eot_samples < 1:
            raise ValueError(f"eot_samples must be an integer >= 1, got {self.eot_samples!r}")
        object.__setattr__(self, "std", float(self.std))

    def apply(self, x: mx.array, key: Optional[mx.array] = None) -> mx.array:
        """``x + std * N(0, I)``; with ``key`` the draw is reproducible (and compile-safe)."""
        return x + self.std * mx.random.normal(x.shape, dtype=x.dtype, key=key)
