"""Evaluation: robust accuracy of a model under an ensemble of attacks (``evaluate``), its report,
and the gradient-masking checks."""

from mlx_robust.evaluation.ensemble import RobustnessReport, attack_names, evaluate

__all__ = ["RobustnessReport", "attack_names", "evaluate"]
