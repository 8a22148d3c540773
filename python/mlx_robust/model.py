"""Deprecated import path: this module moved to :mod:`mlx_robust.robust_model`; the old name is an alias of it."""

import sys

import mlx_robust.robust_model

sys.modules[__name__] = mlx_robust.robust_model
