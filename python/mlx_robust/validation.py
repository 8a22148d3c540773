"""Input validation for defended inference: shape, dtype, NaN/Inf and range, in one C++ pass."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx
import numpy as np

from mlx_robust import _functional
from mlx_robust._functional import ValidationReport

POLICIES = ("raise", "clip")

__all__ = ["POLICIES", "ValidationReport", "as_batch", "as_labels", "check_bounds", "validate"]


def check_bounds(bounds: Any) -> tuple[float, float]:
    """``bounds`` as finite floats (lo, hi) with lo < hi; ValueError naming ``bounds`` otherwise."""
    try:
        lo, hi = (float(b) for b in bounds)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bounds must be a pair of numbers (lo, hi), got {bounds!r}") from exc
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"bounds must be finite with lo < hi, got {bounds!r}")
    return lo, hi


def as_batch(x: Any, name: str = "x") -> mx.array:
    """``x`` (mx.array or numpy/array-like) as a floating mx.array; TypeError for other dtypes.

    numpy float64 becomes float32 (MLX computes in float32 on every backend).
    """
    if isinstance(x, mx.array):
        arr = x
    else:
        try:
            np_x = np.asarray(x)
        except Exception as exc:  # ragged lists and the like
            raise TypeError(f"{name} must be an mx.array or a numpy array, got {type(x).__name__}") from exc
        if np_x.dtype == object or not np.issubdtype(np_x.dtype, np.number) and np_x.dtype != np.bool_:
            raise TypeError(f"{name} must be a numeric array, got dtype {np_x.dtype}")
        if np.issubdtype(np_x.dtype, np.floating) and np_x.dtype != np.float16:
            np_x = np_x.astype(np.float32)
        arr = mx.array(np_x)
    if not mx.issubdtype(arr.dtype, mx.floating):
        raise TypeError(f"{name} must be floating point (float32, float16 or bfloat16), got {arr.dtype}")
    return arr


def as_labels(y: Any, n: int, num_classes: Optional[int], name: str = "y") -> mx.array:
    """Labels as (N,) int32 in [0, num_classes); ValueError/TypeError naming ``name`` otherwise."""
    np_y = np.asarray(y) if not isinstance(y, mx.array) else np.array(y)
    if not (np.issubdtype(np_y.dtype, np.integer) or np_y.dtype == np.bool_):
        raise TypeError(f"{name} must hold integer class labels, got dtype {np_y.dtype}")
    if np_y.ndim != 1:
        raise ValueError(f"{name} must have shape (N,), got shape {np_y.shape}")
    if np_y.shape[0] != n:
        raise ValueError(f"{name} has {np_y.shape[0]} labels but x has {n} samples")
    if n and (np_y.min() < 0 or (num_classes is not None and np_y.max() >= num_classes)):
        bad = np.flatnonzero((np_y < 0) | (np_y >= (num_classes or np.iinfo(np.int64).max)))[:10]
        raise ValueError(
            f"{name} has labels outside [0, {num_classes}) at samples {bad.tolist()}"
        )
    return mx.array(np_y.astype(np.int32))


def validate(
    x: Any,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
    input_shape: Optional[Sequence[int]] = None,
    policy: str = "raise",
    name: str = "x",
) -> tuple[mx.array, ValidationReport]:
    """Check a batch before it reaches a model.

    One fused C++ pass counts, per sample, NaN/Inf values and finite values outside ``bounds``;
    the structure (rank >= 2, N >= 1, floating dtype, per-sample shape ``input_shape``) is checked
    without reading data.

    Args:
        x: batch (N, *input_shape), mx.array or numpy.
        bounds: valid input range (lo, hi).
        input_shape: expected shape of one sample, or None to accept any.
        policy: "raise" — ValueError naming the problem, the count and the first offending samples;
            "clip" — clip out-of-range values into ``bounds`` (NaN/Inf still raise).
        name: argument name used in error messages.

    Returns:
        (x, report): the (possibly clipped) batch and the per-sample report.

    Raises:
        TypeError: non-floating dtype. ValueError: everything else above.
    """
    arr, lo, hi = _prepare(x, bounds, policy, name)
    report = _functional.validate_batch(arr, input_shape, lo, hi, name)
    _raise_for(report, policy, lo, hi, name)
    if report.total_out_of_range:  # policy "clip" (else _raise_for raised)
        arr = mx.clip(arr, lo, hi)
    return arr, report


def validate_deferred(
    x: Any,
    *,
    bounds: tuple[float, float] = (0.0, 1.0),
    input_shape: Optional[Sequence[int]] = None,
    policy: str = "raise",
    name: str = "x",
) -> tuple[mx.array, Callable[[], ValidationReport]]:
    """:func:`validate` without the wait: the structure is checked now (raising as ``validate``
    does), the counts are queued on the device, and ``finish()`` reads them and raises what
    ``validate`` would have raised. Work queued before ``finish()`` (an attack) then does not wait
    for a device round trip; its result must be discarded if ``finish()`` raises.

    With policy "clip" the returned batch is clipped into ``bounds`` (a no-op for valid values).
    """
    arr, lo, hi = _prepare(x, bounds, policy, name)
    pending = _functional.start_validation(arr, input_shape, lo, hi, name)

    def finish() -> ValidationReport:
        report = _functional.finish_validation(pending)
        _raise_for(report, policy, lo, hi, name)
        return report

    return (mx.clip(arr, lo, hi) if policy == "clip" else arr), finish


def _prepare(x: Any, bounds: tuple[float, float], policy: str, name: str) -> tuple[mx.array, float, float]:
    """The checks of validate's arguments that read no data: policy, bounds, conversion to a batch."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    lo, hi = check_bounds(bounds)
    return as_batch(x, name), lo, hi


def _raise_for(report: ValidationReport, policy: str, lo: float, hi: float, name: str) -> None:
    if report.total_nonfinite:
        raise ValueError(
            f"{name} contains {report.total_nonfinite} NaN/Inf value(s) in "
            f"{int(mx.sum(report.nonfinite > 0).item())} sample(s); first offending samples: "
            f"{list(report.nonfinite_samples)}"
        )
    if report.total_out_of_range:
        if policy != "clip":
            raise ValueError(
                f"{name} has {report.total_out_of_range} value(s) outside the bounds [{lo}, {hi}] in "
                f"{int(mx.sum(report.out_of_range > 0).item())} sample(s); first offending samples: "
                f"{list(report.out_of_range_samples)} (use on_invalid='clip' to clip them)"
            )
