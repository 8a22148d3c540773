"""Data-parallel (adversarial) training over MLX's own distributed layer.

Launch one process per device or host with ``mlx.launch`` (ring backend on CPUs and Macs, NCCL on
CUDA), e.g. on one machine::

    mlx.launch -n 2 --backend ring -- python train.py

Every process builds the same model (same seed), sees the same global batch, keeps its own shard
(:func:`shard`), attacks it, and averages the gradients (``mlx.nn.average_gradients``), so every
process applies the same update: the parameters stay identical and equal to single-process
training on the global batch (up to float rounding). ``mr.train(..., distributed=True)`` does all
of this; :func:`data_parallel` wraps a ``value_and_grad`` function for your own loop.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

__all__ = ["data_parallel", "launch_command", "shard"]


def _group(group: Optional[mx.distributed.Group]) -> mx.distributed.Group:
    return mx.distributed.init() if group is None else group


def shard(x: mx.array, group: Optional[mx.distributed.Group] = None) -> mx.array:
    """This process's contiguous block of a global batch ``x`` (split along axis 0).

    Raises ValueError if the batch does not split evenly over the group's processes.
    """
    g = _group(group)
    n, size = x.shape[0], g.size()
    if n % size:
        raise ValueError(f"the global batch of {n} does not split evenly over {size} processes")
    per = n // size
    return x[g.rank() * per : (g.rank() + 1) * per]


def data_parallel(
    value_and_grad_fn: Callable[..., tuple[mx.array, Any]],
    group: Optional[mx.distributed.Group] = None,
) -> Callable[..., tuple[mx.array, Any]]:
    """Wrap ``value_and_grad_fn(model, x, y, ...)`` for data-parallel training.

    The wrapper is called with this process's *local* batch (e.g. from :func:`shard`) and returns
    ``(loss, grads)`` averaged over all processes: ``all_sum(loss) / size`` and
    ``nn.average_gradients(grads)``. With a mean-reduced loss and equal local batches this is the
    loss and gradient of the global batch. Works with ``nn.value_and_grad`` and with
    ``mr.adversarial_value_and_grad`` (each process attacks its own shard; Madry et al. 2018) and
    inside ``mx.compile`` (for the compile-safe half ``loss_and_grad.value_and_grad``).

    Example:
        >>> step_vg = mr.distributed.data_parallel(loss_and_grad)
        >>> loss, grads = step_vg(model, mr.distributed.shard(x), mr.distributed.shard(y))
        >>> optimizer.update(model, grads)
    """
    if not callable(value_and_grad_fn):
        raise TypeError(f"value_and_grad_fn must be callable, got {type(value_and_grad_fn).__name__}")
    g = _group(group)

    def averaged(*args: Any, **kwargs: Any) -> tuple[mx.array, Any]:
        loss, grads = value_and_grad_fn(*args, **kwargs)
        if g.size() == 1:
            return loss, grads
        return mx.distributed.all_sum(loss, group=g) / g.size(), nn.average_gradients(grads, group=g)

    # Keep the compile-safe half reachable (loss_and_grad.value_and_grad / perturb / state).
    for name in ("perturb", "state", "method"):
        if hasattr(value_and_grad_fn, name):
            setattr(averaged, name, getattr(value_and_grad_fn, name))
    if hasattr(value_and_grad_fn, "value_and_grad"):
        inner = value_and_grad_fn.value_and_grad

        def averaged_given(*args: Any, **kwargs: Any) -> tuple[mx.array, Any]:
            loss, grads = inner(*args, **kwargs)
            if g.size() == 1:
                return loss, grads
            return mx.distributed.all_sum(loss, group=g) / g.size(), nn.average_gradients(grads, group=g)

        averaged.value_and_grad = averaged_given  # type: ignore[attr-defined]
    return averaged


def launch_command(
    script: Sequence[str], *, processes: int = 2, backend: str = "ring", starting_port: Optional[int] = None
) -> list[str]:
    """The ``mlx.launch`` command line that runs ``script`` (argv after the interpreter) in
    ``processes`` local processes with this Python interpreter.

    ``mlx.launch`` is the console script installed with MLX next to the interpreter; if it is
    missing, its entry point is called through ``python -c``. Note: ``mlx.launch`` 0.32 exits 0
    even when a rank fails, so check the ranks' own output.
    """
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    exe = Path(sys.executable).with_name("mlx.launch")
    if exe.exists():
        launcher = [str(exe)]
    elif shutil.which("mlx.launch"):
        launcher = [shutil.which("mlx.launch")]  # type: ignore[list-item]
    else:
        launcher = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
    cmd = launcher + ["-n", str(processes), "--backend", backend]
    if starting_port is not None:
        cmd += ["--starting-port", str(starting_port)]
    return cmd + ["--", sys.executable, *script]
