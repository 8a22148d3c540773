"""``mlx-robust``'s argument parser and entry point."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import mlx_robust as mr
from mlx_robust.cli.commands import certify_command, evaluate_cmd, positive_int
from mlx_robust.cli.demo import demo
from mlx_robust.evaluation.ensemble import attack_names


_MODEL_HELP = ("'package.module:factory' returning an mlx.nn.Module. This imports the module and "
               "calls factory(), running their code like 'python -m' would: name only code you "
               "trust. The module must be importable (installed, or on PYTHONPATH, e.g. "
               "PYTHONPATH=. for a file in the current folder)")


def build_parser() -> argparse.ArgumentParser:
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
