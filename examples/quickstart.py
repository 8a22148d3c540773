"""Quickstart: train a small classifier on the embedded digits, then attack it.

    python examples/quickstart.py --eps 0.1 --steps 20
"""

import argparse

import mlx.core as mx

import mlx_robust as mr
from mlx_robust.training import accuracy, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", type=float, default=0.1, help="L-inf radius (inputs in [0, 1])")
    parser.add_argument("--steps", type=int, default=20, help="PGD steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    mx.random.seed(args.seed)
    x_train, y_train = mr.datasets.load_digits("train")
    x_test, y_test = mr.datasets.load_digits("test")
    model = fit(mr.models.SmallCNN(image_size=8, channels=(16, 32)), x_train, y_train, epochs=15)
    print(f"clean accuracy: {accuracy(model, x_test, y_test):.1%}")

    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10)
    for attack in (mr.FGSM(eps=args.eps), mr.PGD(eps=args.eps, steps=args.steps, restarts=2)):
        res = robust.attack(x_test, y_test, attack, key=mr.key(args.seed))
        print(f"{res.attack:>14}: robust accuracy {res.robust_accuracy:.1%}, "
              f"mean L-inf perturbation {float(res.norms.mean()):.3f}")

    # Targeted: push every image towards class 0.
    target = mx.zeros_like(y_test)
    res = robust.attack(x_test, y_test, mr.PGD(eps=args.eps, steps=args.steps), y_target=target, key=mr.key(1))
    print(f"targeted PGD reaches class 0 on {res.success_rate:.1%} of the test images")


if __name__ == "__main__":
    main()
