"""Argument checks shared by every configuration (attacks, defences, training).

Each check raises ``ValueError`` (or ``TypeError`` for a value of the wrong kind) naming the
argument, the constraint and the value received. Nothing here imports another ``mlx_robust``
module.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import mlx.core as mx
import numpy as np

EpsLike = Union[float, Sequence[float], np.ndarray, mx.array]

NORMS = ("linf", "l2")

FLOAT32_MAX = float(np.finfo(np.float32).max)


def is_int(v: object) -> bool:
    """Whether ``v`` is a Python or NumPy integer (booleans are not)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def scalar(v: object) -> Optional[float]:
    """A Python/numpy/MLX number (0-d) as float, else None (a per-sample vector)."""
    if isinstance(v, (bool, np.bool_)):
        raise TypeError(f"expected a number, got {v!r}")
    if isinstance(v, (int, float, np.number)):
        return float(v)
    if isinstance(v, (mx.array, np.ndarray)) and v.ndim == 0:
        return float(v.item())
    return None


def finite32(value: float) -> bool:
    """Whether ``value`` is finite and stays finite as float32 (the attacks compute in float32:
    1e39 is finite in float64 but infinite in float32)."""
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def float32_note(value: float) -> str:
    """What to add to a "must be a finite number" error for a value only float32 overflows."""
    if math.isfinite(value) and not finite32(value):
        return f" (infinite in float32, whose largest value is {FLOAT32_MAX:.8g})"
    return ""


def check_positive(value: object, name: str, allow_zero: bool) -> object:
    """Validate a scalar or per-sample (N,) setting; returns it with scalars as float."""
    op = ">= 0" if allow_zero else "> 0"
    bad = (lambda a: a < 0) if allow_zero else (lambda a: a <= 0)
    s = scalar(value)
    if s is not None:
        if not finite32(s) or bad(s):
            raise ValueError(f"{name} must be a finite number {op}, got {s}{float32_note(s)}")
        return s
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a number or a per-sample vector of shape (N,)") from exc
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a number or a per-sample vector of shape (N,), got shape {arr.shape}")
    if not np.all(np.isfinite(arr) & (np.abs(arr) <= FLOAT32_MAX)) or np.any(bad(arr)):
        every = "finite and >= 0" if allow_zero else "> 0 and finite"
        raise ValueError(
            f"{name} must be {every} for every sample (finite in float32: at most {FLOAT32_MAX:.8g})"
        )
    return value


def check_int(value: object, name: str, *, low: int = 1, optional: bool = False) -> Optional[int]:
    """``value`` as an int >= ``low`` (or None when ``optional``); ValueError naming ``name`` otherwise."""
    if optional and value is None:
        return None
    if not is_int(value) or value < low:
        what = f"None or an integer >= {low}" if optional else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_choice(value: object, name: str, choices: Sequence[str]) -> None:
    """ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_flag(value: object, name: str) -> None:
    """ValueError naming ``name`` unless ``value`` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_fraction(value: object, name: str) -> float:
    """``value`` as a float in (0, 1]; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def per_sample(value: EpsLike, n: int, name: str) -> mx.array:
    """A scalar or (N,) vector as an (N,) float32 array; ValueError naming ``name`` otherwise."""
    s = scalar(value)
    if s is not None:
        return mx.full((n,), s, dtype=mx.float32)
    arr = np.asarray(value, dtype=np.float32)
    if arr.shape != (n,):
        raise ValueError(f"{name} must be a number or have shape ({n},) (one per sample), got shape {arr.shape}")
    return mx.array(arr)


def fresh_key() -> mx.array:
    """A PRNG key drawn from MLX's global generator, so ``mx.random.seed(...)`` makes calls that
    were given no key repeatable."""
    return mx.random.key(int(mx.random.randint(0, 2**31 - 1, shape=()).item()))
