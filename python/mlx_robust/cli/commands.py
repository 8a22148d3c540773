"""The commands of ``mlx-robust``: ``evaluate`` and ``certify`` on a user's model and data."""

from __future__ import annotations

import argparse
import importlib
import os
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

import mlx_robust as mr
from mlx_robust._files import write_text
from mlx_robust.defences.smoothing import (
    Smoothing,
    certified_accuracy,
    certified_accuracy_table,
    distributed_group,
    plot_certified_accuracy,
)


def load_model(spec: str, weights: Optional[str] = None) -> nn.Module:
    """Build ``module:factory`` (a callable returning an ``nn.Module``) and load ``weights``.

    This imports ``module`` and calls ``factory()``: like ``python -m``, it runs that module's
    code, so name only code you trust. The module is found on ``sys.path`` as it is (an installed
    package, or ``PYTHONPATH``); the current directory is not added to it. ``factory`` may also
    name an ``nn.Module`` instance, which is used as it is.

    Raises ValueError with the reason for a bad spec, a factory that is not callable or does not
    return a module, or a weights file that does not match the model (MLX names the parameters
    that differ).
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must look like 'package.module:factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"cannot load --model {spec!r}: {exc} (the module must be importable: installed, or on "
            f"PYTHONPATH; the current directory is not searched)"
        ) from exc
    if isinstance(factory, nn.Module):
        model = factory
    elif not callable(factory):
        raise ValueError(
            f"--model {spec!r} must name a callable that returns an mlx.nn.Module (a class or a "
            f"function), got {type(factory).__name__}"
        )
    else:
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"--model {spec!r} must return an mlx.nn.Module, got {type(model).__name__}"
            )
    if weights is not None:
        if not os.path.exists(weights):
            raise ValueError(f"--weights file {weights!r} does not exist")
        try:
            model.load_weights(weights, strict=True)
        except Exception as exc:  # MLX raises ValueError/RuntimeError naming the mismatched keys
            raise ValueError(f"--weights {weights!r} do not match the model: {exc}") from exc
    mx.eval(model.parameters())
    model.eval()
    return model


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _write_report(report, out: Optional[str]) -> None:
    print(report.to_markdown())
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    write_text(os.path.join(out, "report.md"), report.to_markdown())
    report.to_json(os.path.join(out, "report.json"))
    try:
        report.plot(os.path.join(out, "robust_accuracy.png"))
        print(f"wrote {out}/report.md, report.json and robust_accuracy.png")
    except ImportError as exc:
        print(f"wrote {out}/report.md and report.json ({exc})")


def evaluate_cmd(args: argparse.Namespace) -> int:
    """Evaluate a user's model on a user's .npz file and write the report."""
    model = load_model(args.model, args.weights)
    x, y = mr.datasets.load_npz(args.data)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    robust = mr.RobustModel(model, bounds=tuple(args.bounds), input_shape=tuple(x.shape[1:]))
    report = mr.evaluate(robust, x, y, attacks=args.attacks, eps=args.eps, norm=args.norm,
                         batch_size=args.batch_size, key=mr.key(args.seed), progress=True)
    _write_report(report, args.out)
    return 0


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def certify_command(args: Any) -> int:
    """``mlx-robust certify``: certified accuracy table (and plot) of a user's model and data.

    Loads ``--model module:factory`` with ``--weights``, the ``--data`` .npz (arrays x, y), and
    runs :func:`certified_accuracy` at every ``--sigma``; under ``mlx.launch`` the inputs are
    sharded across the processes and rank 0 prints.
    """
    model = load_model(args.model, args.weights)
    x, y = mr.datasets.load_npz(args.data)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    group = distributed_group(None)
    rank0 = group is None or group.rank() == 0
    reports = []
    for sigma in args.sigma:
        robust = mr.RobustModel(
            model, bounds=tuple(args.bounds), input_shape=tuple(x.shape[1:]),
            smoothing=Smoothing(sigma=sigma, n=args.n, n0=args.n0, alpha=args.alpha, batch_size=args.batch_size),
        )
        reports.append(certified_accuracy(robust, x, y, args.radii, key=mr.key(args.seed), group=group,
                                          progress=None if rank0 else False))
    if not rank0:
        return 0
    first = reports[0]
    text = (
        f"Certified L2 accuracy under randomized smoothing (Cohen et al. 2019): {x.shape[0]} inputs, "
        f"n0={first.n0}, n={first.n}, alpha={first.alpha:g}\n\n{certified_accuracy_table(reports)}"
    )
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_text(os.path.join(args.out, "certified_accuracy.md"), text + "\n")
        try:
            plot_certified_accuracy(reports, os.path.join(args.out, "certified_accuracy.png"))
            print(f"wrote {args.out}/certified_accuracy.md and certified_accuracy.png")
        except ImportError as exc:
            print(f"wrote {args.out}/certified_accuracy.md ({exc})")
    return 0
