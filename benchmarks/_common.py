"""What every benchmark shares: the backend line of a report, the benchmark models, and one timer.

Scripts in this folder import it as ``from _common import ...`` (Python puts a script's own
folder first on ``sys.path``); the ``gpu/`` scripts add this folder to the path once. Only the
standard library is imported at the top, so the PyTorch side of a comparison can use the timer.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable


def backend_description() -> str:
    """The default device and, on the CPU, which BLAS libmlx links (it decides CPU timings)."""
    import mlx.core as mx  # here, not at the top: the PyTorch side of a comparison has no MLX

    dev = mx.default_device()
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    name = info.get("device_name", "?")
    if dev.type == mx.cpu:
        blas = "Accelerate" if platform.system() == "Darwin" else "unknown BLAS"
        if platform.system() == "Linux":
            lib = Path(mx.__file__).parent / "lib" / "libmlx.so"
            try:
                out = subprocess.run(["ldd", str(lib)], capture_output=True, text=True).stdout
                libs = [ln.split()[0] for ln in out.splitlines() if "blas" in ln.lower()]
                blas = ", ".join(libs) or "no BLAS linked"
            except OSError:
                pass
        return f"{dev} ({name}), BLAS: {blas}"
    return f"{dev} ({name})"


def make_model(kind: str) -> Any:
    """The benchmark models on 28x28x1 inputs: "mlp" (784-256-256-10) or "cnn" (SmallCNN 32/64)."""
    import mlx_robust as mr

    if kind == "mlp":
        return mr.models.MLP(784, hidden=(256, 256), num_classes=10)
    return mr.models.SmallCNN(in_channels=1, num_classes=10, image_size=28, channels=(32, 64))


def median_time(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of ``fn()`` (which must evaluate its result) over ``reps`` calls, after one
    warm-up call (traces, JIT-compiles, autotunes)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn()`` (which must evaluate its result), no warm-up."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
