"""The core's exact rewrite of max pooling in the traced model (on by default).

Every attack, certification and smoothing call traces the model's forward in the C++ core. Before
differentiating and compiling it, the core replaces each non-overlapping window max -- what
``nn.MaxPool1d/2d/3d`` builds when the stride equals the kernel size and divides the input -- by the
elementwise maximum of the window's strided slices, with a custom gradient equal to MLX's gradient
of ``max`` (the cotangent split evenly between the entries that equal the maximum). Values and
gradients are the same to the bit; MLX's CUDA backend runs the rewritten form about 1.6x faster
for the benchmark CNN's forward+backward (``benchmarks/gpu/profile_pool.py``). The model object
is never changed: only the core's own trace of it.

Turn it off for a run with ``MLX_ROBUST_FAST_POOL=0`` in the environment (read at import), or at
any time with :func:`set_fast_pooling`; compiled functions are keyed on the setting.
"""

from __future__ import annotations

from mlx_robust import _functional


def set_fast_pooling(enabled: bool) -> None:
    """Turn the core's exact max-pooling rewrite on (the default) or off."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _functional.set_fast_pool(enabled)


def fast_pooling_enabled() -> bool:
    """Whether the core rewrites max pooling in the traced model (see the module docstring)."""
    return _functional.fast_pool_enabled()
