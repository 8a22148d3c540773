"""The ``mlx-robust`` command line: ``demo``, ``evaluate`` and ``--version``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn

from mlx_robust._files import write_text


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


def demo_ensemble(eps: float):
    """The demo's ensemble at one eps: standalone FGSM and PGD, then AutoAttack-style attacks."""
    import mlx_robust as mr

    return [
        mr.FGSM(eps=eps),
        mr.PGD(eps=eps, steps=20),
    ] + [a for a in _optional_attacks(eps)]


def _optional_attacks(eps: float):
    import mlx_robust as mr

    if hasattr(mr, "APGD"):
        yield mr.APGD(eps=eps, steps=50)
    if hasattr(mr, "APGDT"):
        yield mr.APGDT(eps=eps, steps=50, n_target_classes=3)
    if hasattr(mr, "Square"):
        yield mr.Square(eps=eps, n_queries=1000)


def demo(args: argparse.Namespace) -> int:
    """Train a small CNN on the embedded digits, then evaluate it under an attack ensemble."""
    import mlx_robust as mr
    from mlx_robust.training import accuracy, fit

    mx.random.seed(args.seed)
    x_train, y_train = mr.datasets.load_digits("train")
    x_test, y_test = mr.datasets.load_digits("test")
    print(f"mlx-robust {mr.__version__} on {mx.default_device()} — UCI digits: "
          f"{x_train.shape[0]} train / {x_test.shape[0]} test, 8x8x1 in [0, 1]")

    model = mr.models.SmallCNN(image_size=8, channels=(16, 32))
    t0 = time.perf_counter()
    fit(model, x_train, y_train, epochs=args.epochs, seed=args.seed, progress="training")
    clean = accuracy(model, x_test, y_test)
    print(f"trained SmallCNN for {args.epochs} epochs in {time.perf_counter() - t0:.1f} s; "
          f"clean test accuracy {clean:.1%}\n")

    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10)
    eps_list = [float(e) for e in args.eps]
    t0 = time.perf_counter()
    report = mr.evaluate(robust, x_test, y_test, attacks=demo_ensemble(max(eps_list)), eps=eps_list,
                         key=mr.key(args.seed), progress=True)
    print(f"Robustness of the standard model (L-inf, {len(report.attacks)} attacks x {len(eps_list)} eps "
          f"in {time.perf_counter() - t0:.1f} s):\n")
    _write_report(report, args.out)
    from mlx_robust.smoothing import certified_demo_line
    from mlx_robust.trainer import adversarial_training_demo

    print(f"\nAdversarial training (PGD-AT, Madry et al. 2018) at the demo's main eps {DEMO_AT_EPS}, "
          "judged by PGD-20:")
    print(adversarial_training_demo(x_train, y_train, x_test, y_test, eps=DEMO_AT_EPS, steps=20,
                                    epochs=args.at_epochs, seed=args.seed))
    plot = os.path.join(args.out, "certified_accuracy.png") if args.out and _have_matplotlib() else None
    if plot:
        print("\n" + certified_demo_line(model, x_test, y_test, seed=args.seed, plot=plot))
        print(f"wrote {plot}")
    else:
        print("\n" + certified_demo_line(model, x_test, y_test, seed=args.seed, plot=None))
    return 0


# The eps the demo's adversarial training targets: 0.2 of the [0, 1] range is about 3 of the
# digits' 17 grey levels (MNIST's customary 0.3 is about 5 of 16 bits' worth of contrast steps).
DEMO_AT_EPS = 0.2


def evaluate_cmd(args: argparse.Namespace) -> int:
    """Evaluate a user's model on a user's .npz file and write the report."""
    import mlx_robust as mr

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


_MODEL_HELP = ("'package.module:factory' returning an mlx.nn.Module. This imports the module and "
               "calls factory(), running their code like 'python -m' would: name only code you "
               "trust. The module must be importable (installed, or on PYTHONPATH, e.g. "
               "PYTHONPATH=. for a file in the current folder)")


def build_parser() -> argparse.ArgumentParser:
    import mlx_robust as mr
    from mlx_robust.evaluate import attack_names

    parser = argparse.ArgumentParser(prog="mlx-robust", description="Adversarial robustness for MLX.")
    parser.add_argument("--version", action="version", version=f"mlx-robust {mr.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train a small CNN on the embedded digits and evaluate it")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    p.add_argument("--eps", nargs="+", default=["0", "0.05", "0.1", "0.2", "0.3"],
                   help="L-inf radii to attack at (default 0 0.05 0.1 0.2 0.3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--at-epochs", type=int, default=10, help="adversarial-training epochs (default 10)")
    p.add_argument("--out", default="mlx-robust-demo", help="folder for report.md/json and the plot "
                   "(default ./mlx-robust-demo; '' to skip)")
    p.set_defaults(func=demo)

    p = sub.add_parser("evaluate", help="evaluate a model on your data under an attack ensemble")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--weights", help=".safetensors/.npz weights for the model (model.load_weights)")
    p.add_argument("--data", required=True, help=".npz with arrays x (N, ...) in the bounds and y (N,)")
    p.add_argument("--eps", nargs="+", type=float, default=[0.0, 0.1, 0.2, 0.3], help="radii")
    p.add_argument("--attacks", nargs="+", default=None, choices=attack_names(),
                   help="attacks (default: apgd-ce apgd-t square, with per-sample early stop)")
    p.add_argument("--norm", choices=["linf", "l2"], default="linf")
    p.add_argument("--bounds", nargs=2, type=float, default=[0.0, 1.0], metavar=("LO", "HI"))
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate only the first N samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for report.md, report.json, robust_accuracy.png")
    p.set_defaults(func=evaluate_cmd)

    from mlx_robust.smoothing import certify_command

    p = sub.add_parser("certify", help="certified L2 accuracy of a model under randomized smoothing")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--weights", help=".safetensors/.npz weights for the model (model.load_weights)")
    p.add_argument("--data", required=True, help=".npz with arrays x (N, ...) in the bounds and y (N,)")
    p.add_argument("--sigma", nargs="+", type=float, required=True,
                   help="noise levels to certify at (one table row each), e.g. 0.12 0.25 0.5")
    p.add_argument("--n0", type=positive_int, default=100, help="selection samples per input (default 100)")
    p.add_argument("--n", type=positive_int, default=10_000,
                   help="estimation samples per input (default 10000; the paper uses 100000)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--radii", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="L2 radii of the table (default 0 0.25 0.5 0.75 1)")
    p.add_argument("--bounds", nargs=2, type=float, default=[0.0, 1.0], metavar=("LO", "HI"))
    p.add_argument("--batch-size", type=positive_int, default=1000, help="noisy copies per model call")
    p.add_argument("--limit", type=positive_int, default=None, help="certify only the first N samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for certified_accuracy.md and .png")
    p.set_defaults(func=certify_command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"mlx-robust: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
