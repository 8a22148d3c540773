"""Deprecated import path: this module moved to :mod:`mlx_robust.training.objectives`; the old name is an alias of it."""

import sys

import mlx_robust.training.objectives

sys.modules[__name__] = mlx_robust.training.objectives
