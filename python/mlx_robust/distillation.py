"""Deprecated import path: this module moved to :mod:`mlx_robust.defences.distillation`; the old name is an alias of it."""

import sys

import mlx_robust.defences.distillation

sys.modules[__name__] = mlx_robust.defences.distillation
