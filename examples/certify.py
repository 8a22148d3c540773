"""Certified L2 robustness with randomized smoothing on the embedded 8x8 digits.

Cohen, Rosenfeld & Kolter 2019, "Certified Adversarial Robustness via Randomized Smoothing"
(https://arxiv.org/abs/1902.02918): for each noise level sigma, train an MLP with Gaussian noise
augmentation at that sigma, then CERTIFY every test image and print the certified accuracy (the
fraction of test images classified correctly with a certified L2 radius >= r) at several radii.

    python examples/certify.py                         # sigma 0.12 0.25 0.5, n = 1000
    python examples/certify.py --n 100000 --out certified.png   # the paper's n (slow on a CPU)

To certify your own model and data, possibly sharded over processes with ``mlx.launch``, use
``mlx-robust certify --model module:factory --weights w.safetensors --data d.npz --sigma 0.25``.
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx
import mlx_robust as mr
from mlx_robust.defences.smoothing import certified_accuracy_table, plot_certified_accuracy
from mlx_robust.training import accuracy, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sigma", nargs="+", type=float, default=[0.12, 0.25, 0.5], help="noise levels")
    parser.add_argument("--n0", type=int, default=100, help="selection samples per image (paper: 100)")
    parser.add_argument("--n", type=int, default=1000, help="estimation samples per image (paper: 100000)")
    parser.add_argument("--alpha", type=float, default=0.001, help="failure probability (paper: 0.001)")
    parser.add_argument("--radii", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per sigma")
    parser.add_argument("--hidden", nargs="+", type=int, default=[256, 256], help="MLP hidden sizes")
    parser.add_argument("--batch-size", type=int, default=1000, help="noisy copies per model call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the certified-accuracy plot here (needs matplotlib)")
    args = parser.parse_args()

    x_train, y_train = mr.datasets.load_digits("train")
    x_test, y_test = mr.datasets.load_digits("test")
    print(f"mlx-robust {mr.__version__} on {mx.default_device()}: UCI digits, {x_train.shape[0]} train / "
          f"{x_test.shape[0]} test, 8x8x1 in [0, 1]; MLP 64-{'-'.join(map(str, args.hidden))}-10")

    reports = []
    for sigma in args.sigma:
        mx.random.seed(args.seed)
        model = mr.models.MLP(64, hidden=tuple(args.hidden), num_classes=10)
        t0 = time.perf_counter()
        fit(model, x_train, y_train, epochs=args.epochs, seed=args.seed, noise_std=sigma)
        trained = time.perf_counter() - t0
        robust = mr.RobustModel(
            model, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10,
            smoothing=mr.Smoothing(sigma=sigma, n=args.n, n0=args.n0, alpha=args.alpha,
                                   batch_size=args.batch_size),
        )
        report = mr.certified_accuracy(robust, x_test, y_test, args.radii, key=mr.key(args.seed))
        reports.append(report)
        print(f"sigma={sigma:g}: trained with noise in {trained:.1f} s (clean accuracy of the base model "
              f"{accuracy(model, x_test, y_test):.1%}); certified {x_test.shape[0]} images in "
              f"{report.seconds:.1f} s", flush=True)

    print(f"\nCertified L2 accuracy on the digits test set (n0={args.n0}, n={args.n}, alpha={args.alpha:g}; "
          "an abstention counts as wrong):\n")
    print(certified_accuracy_table(reports))
    if args.out:
        print(f"\nwrote {plot_certified_accuracy(reports, args.out)}")


if __name__ == "__main__":
    main()
