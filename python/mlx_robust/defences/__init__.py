"""Defences: Gaussian input noise, randomized smoothing (Cohen et al. 2019) with its statistics,
and defensive distillation (Papernot et al. 2016)."""

from mlx_robust.defences.noise import GaussianNoise
from mlx_robust.defences.smoothing import Certification, CertifiedAccuracy, Smoothing, certified_accuracy

__all__ = ["Certification", "CertifiedAccuracy", "GaussianNoise", "Smoothing", "certified_accuracy"]
