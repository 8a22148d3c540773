"""Randomized input defences applied by RobustModel before the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from mlx_robust._checks import finite32, float32_note


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
        """``x + std * N(0, I)``; with ``key`` the draw is reproducible (and compile-safe).

        ``key`` is one PRNG key (2,) for the whole batch, or per-row keys (N, 2) (what the attack
        engines pass): row i is then drawn from key i alone, so a sample's noise does not depend on
        the batch it is in. None draws from MLX's global generator.
        """
        if key is not None and key.ndim == 2:
            if key.shape[0] != x.shape[0]:
                raise ValueError(f"key must be one key (2,) or one per row ({x.shape[0]}, 2), got shape {key.shape}")
            row_shape = tuple(x.shape[1:])
            draw = mx.vmap(lambda k: mx.random.normal(row_shape, dtype=x.dtype, key=k))
            return x + self.std * draw(key)
        return x + self.std * mx.random.normal(x.shape, dtype=x.dtype, key=key)
