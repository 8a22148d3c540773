"""Cost of adversarial training: one epoch of mr.train per method, relative to a standard epoch.

PGD-AT with k attack steps does k forward+backward passes w.r.t. the input plus the usual
forward+backward for the update, so an epoch should cost about k + 1 standard epochs. This prints
the measured ratio next to k + 1 (TRADES: k + 3, its loss runs the model on x twice and on x_adv
once; FGSM-RS: 2; Free AT with m replays: m), all measured in one process:

    python benchmarks/bench_training.py                       # digits 8x8 CNN, batch 64
    python benchmarks/bench_training.py --data mnist-shape --batch 128 --steps 3 7
"""

from __future__ import annotations

import argparse
import statistics

import mlx.core as mx
import mlx.optimizers as optim

import mlx_robust as mr

from _common import backend_description


def data(kind: str, n: int) -> tuple[mx.array, mx.array, int]:
    if kind == "digits":
        x, y = mr.datasets.load_digits("train")
        return x, y, 8
    # Random data of MNIST's shape: the cost does not depend on the pixel values.
    mx.random.seed(0)
    x = mx.random.uniform(shape=(n, 28, 28, 1))
    y = mx.random.randint(0, 10, (n,))
    mx.eval(x, y)
    return x, y, 28


def epoch_seconds(x, y, side: int, method: str, steps: int, batch: int, epochs: int, **extra) -> float:
    """Median training time of an epoch (the first epoch, which compiles, is left out)."""
    mx.random.seed(0)
    channels = (16, 32) if side == 8 else (32, 64)
    model = mr.models.SmallCNN(image_size=side, channels=channels)
    hist = mr.train(
        model, x, y, epochs=epochs + 1, batch_size=batch, method=method,
        attack=None if method == "standard" else mr.PGD(eps=0.1, steps=steps),
        optimizer=optim.Adam(learning_rate=1e-3), progress=False, **extra,
    )
    return statistics.median(e.seconds for e in hist.epochs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["digits", "mnist-shape"], default="digits")
    parser.add_argument("--samples", type=int, default=1024, help="training samples for mnist-shape (default 1024)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", nargs="+", type=int, default=[1, 3, 7, 10], help="PGD-AT attack steps k")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per method (median reported)")
    parser.add_argument("--methods", nargs="+", default=["pgd-at", "trades", "fgsm-rs", "free"],
                        choices=["pgd-at", "trades", "mart", "fgsm-rs", "free", "mix"])
    args = parser.parse_args()

    x, y, side = data(args.data, args.samples)
    batches = x.shape[0] // args.batch
    print(f"mlx-robust {mr.__version__}, mlx {mx.__version__}, {backend_description()}")
    print(f"{args.data}: {x.shape[0]} samples {side}x{side}x1, SmallCNN, batch {args.batch} "
          f"({batches} updates per epoch), median of {args.epochs} epochs after a warm-up epoch\n")
    standard = epoch_seconds(x, y, side, "standard", 0, args.batch, args.epochs)
    print("| method | attack steps k | epoch s | ratio to standard | expected ≈ | measured / expected |")
    print("|---|---|---|---|---|---|")
    print(f"| standard | 0 | {standard:.3f} | 1.00 | 1 | 1.00 |", flush=True)

    def row(name: str, k: int, expected: float, **extra) -> None:
        t = epoch_seconds(x, y, side, name, k, args.batch, args.epochs, **extra)
        r = t / standard
        label = name + (f" (m={extra['replays']})" if "replays" in extra else "")
        print(f"| {label} | {k} | {t:.3f} | {r:.2f} | {expected:g} | {r / expected:.2f} |", flush=True)

    for method in args.methods:
        if method in ("pgd-at", "mix", "mart", "trades"):
            extra_passes = {"pgd-at": 1, "mix": 2, "mart": 3, "trades": 3}[method]
            for k in args.steps:
                row(method, k, k + extra_passes)
        elif method == "fgsm-rs":
            row(method, 1, 2)
        elif method == "free":
            row(method, 1, 4, replays=4)


if __name__ == "__main__":
    main()
