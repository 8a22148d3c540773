"""The ``mlx-robust`` command line: ``mlx-robust demo`` and ``mlx-robust --version``."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import mlx.core as mx


def demo(args: argparse.Namespace) -> int:
    """Train a small CNN on the embedded digits, then attack it with FGSM and PGD at several eps."""
    from tqdm.auto import tqdm

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
          f"clean test accuracy {clean:.1%}")

    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10)
    attacks = {
        "FGSM": lambda e: mr.FGSM(eps=e),
        f"PGD-{args.steps}": lambda e: mr.PGD(eps=e, steps=args.steps),
    }
    eps_list = [float(e) for e in args.eps]
    rows = {name: [] for name in attacks}
    t0 = time.perf_counter()
    with tqdm(total=len(eps_list) * len(attacks), desc="attacking", unit="attack", leave=False) as bar:
        for e in eps_list:
            for name, make in attacks.items():
                res = robust.attack(x_test, y_test, make(e), key=mr.key(args.seed))
                rows[name].append(res.robust_accuracy)
                bar.update(1)
    elapsed = time.perf_counter() - t0

    header = "| attack | " + " | ".join(f"eps={e:g}" for e in eps_list) + " |"
    print()
    print("Robust accuracy on the digits test set (L-inf, inputs in [0, 1]); clean "
          f"accuracy {clean:.1%}")
    print(header)
    print("|" + "---|" * (len(eps_list) + 1))
    for name, accs in rows.items():
        print(f"| {name} | " + " | ".join(f"{a:.1%}" for a in accs) + " |")
    print(f"\n{len(eps_list) * len(attacks)} attacks on {x_test.shape[0]} images in {elapsed:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    import mlx_robust as mr

    parser = argparse.ArgumentParser(prog="mlx-robust", description="Adversarial robustness for MLX.")
    parser.add_argument("--version", action="version", version=f"mlx-robust {mr.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train a small CNN on the embedded digits and attack it")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps (default 20)")
    p.add_argument("--eps", nargs="+", default=["0", "0.05", "0.1", "0.2", "0.3"],
                   help="L-inf radii to attack at (default 0 0.05 0.1 0.2 0.3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(func=demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
