"""Adversarial training of a small CNN, in your own MLX loop or with mr.train.

On the embedded digits (8x8, no download), compare standard training with PGD-AT (Madry et al.
2018) and optionally TRADES (Zhang et al. 2019):

    python examples/adversarial_training.py --eps 0.1 --epochs 30 --methods standard pgd-at trades

On MNIST from your own idx files (28x28; eps=0.3 is the usual radius there):

    python examples/adversarial_training.py --mnist-dir ~/data/mnist --eps 0.3 --steps 7 --epochs 10

Your own loop (the MLX examples' convention), with the attack outside the compiled step:

    python examples/adversarial_training.py --own-loop --epochs 10

Data-parallel over 2 local processes (each attacks its shard, gradients are averaged):

    mlx.launch -n 2 --backend ring -- python examples/adversarial_training.py --distributed
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

import mlx_robust as mr
from mlx_robust.training import clean_accuracy, robust_accuracy


def load(args: argparse.Namespace) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    if args.mnist_dir is None:
        return (*mr.datasets.load_digits("train"), *mr.datasets.load_digits("test"))
    d = Path(args.mnist_dir).expanduser()

    def find(stem: str) -> Path:
        for name in (stem, stem + ".gz"):
            if (d / name).exists():
                return d / name
        raise SystemExit(f"{d / stem}(.gz) not found: pass the folder holding the four MNIST idx files")

    x_train, y_train = mr.datasets.load_mnist_idx(find("train-images-idx3-ubyte"), find("train-labels-idx1-ubyte"))
    x_test, y_test = mr.datasets.load_mnist_idx(find("t10k-images-idx3-ubyte"), find("t10k-labels-idx1-ubyte"))
    return x_train, y_train, x_test, y_test


def make_model(x: mx.array, seed: int) -> nn.Module:
    mx.random.seed(seed)
    side = int(x.shape[1])
    channels = (16, 32) if side <= 8 else (32, 64)
    model = mr.models.SmallCNN(in_channels=int(x.shape[-1]), image_size=side, channels=channels)
    mx.eval(model.parameters())
    return model


def loss_fn(model: nn.Module, x: mx.array, y: mx.array) -> mx.array:
    return nn.losses.cross_entropy(model(x), y, reduction="mean")


def own_loop(args: argparse.Namespace, data) -> None:
    """PGD-AT written the way MLX users write training loops."""
    x_train, y_train, x_test, y_test = data
    model = make_model(x_train, args.seed)
    steps_per_epoch = x_train.shape[0] // args.batch_size
    optimizer = optim.Adam(learning_rate=optim.cosine_decay(args.lr, args.epochs * steps_per_epoch))
    loss_and_grad = mr.adversarial_value_and_grad(model, loss_fn, attack=mr.PGD(eps=args.eps, steps=args.steps))
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, x_adv, y):
        loss, grads = loss_and_grad.value_and_grad(model, x, x_adv, y)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(args.seed)
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        order = mx.array(rng.permutation(x_train.shape[0]))
        for s in range(0, x_train.shape[0] - args.batch_size + 1, args.batch_size):
            idx = order[s : s + args.batch_size]
            x, y = x_train[idx], y_train[idx]
            x_adv = loss_and_grad.perturb(model, x, y)  # the C++ attack, outside mx.compile
            loss = step(x, x_adv, y)
            mx.eval(state)
        robust = mr.RobustModel(model, bounds=(0.0, 1.0))
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, {time.perf_counter() - t0:.1f} s, "
              f"clean {clean_accuracy(robust, x_test, y_test):.1%}, PGD-{args.eval_steps} "
              f"{robust_accuracy(robust, x_test, y_test, mr.PGD(eps=args.eps, steps=args.eval_steps)):.1%}")


def compare(args: argparse.Namespace, data) -> None:
    x_train, y_train, x_test, y_test = data
    group = mx.distributed.init() if args.distributed else None
    rank = 0 if group is None else group.rank()
    steps_per_epoch = x_train.shape[0] // args.batch_size
    evaluation = mr.PGD(eps=args.eps, steps=args.eval_steps)
    rows = []
    for method in args.methods:
        model = make_model(x_train, args.seed)
        extra = {"beta": args.beta} if method in ("trades", "mart") else {}
        if method == "noise":
            extra = {"sigma": args.eps}
        checkpoint = None if args.checkpoint_dir is None else Path(args.checkpoint_dir) / f"{method}.safetensors"
        t0 = time.perf_counter()
        mr.train(
            model, x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, method=method,
            attack=None if method in ("standard", "noise") else mr.PGD(eps=args.eps, steps=args.steps),
            learning_rate=optim.cosine_decay(args.lr, args.epochs * steps_per_epoch), seed=args.seed,
            checkpoint=checkpoint, progress=not args.quiet and rank == 0, distributed=args.distributed, **extra,
        )
        seconds = time.perf_counter() - t0
        robust = mr.RobustModel(model, bounds=(0.0, 1.0))
        rows.append((method, clean_accuracy(robust, x_test, y_test),
                     robust_accuracy(robust, x_test, y_test, evaluation, seed=args.seed), seconds))
    if rank != 0:
        return
    side = x_train.shape[1]
    print(f"\n{x_train.shape[0]} training images {side}x{side}, {args.epochs} epochs, seed {args.seed}; "
          f"training attack PGD-{args.steps} L-inf eps={args.eps:g}")
    print(f"| training | clean accuracy | PGD-{args.eval_steps} robust accuracy (eps={args.eps:g}) | time |")
    print("|---|---|---|---|")
    for method, clean, rob, seconds in rows:
        print(f"| {method} | {clean:.1%} | {rob:.1%} | {seconds:.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mnist-dir", default=None, help="folder with MNIST idx files (default: embedded digits)")
    parser.add_argument("--methods", nargs="+", default=["standard", "pgd-at"],
                        choices=["standard", "pgd-at", "trades", "mart", "fgsm-rs", "free", "noise", "mix"])
    parser.add_argument("--eps", type=float, default=0.1, help="L-inf radius, inputs in [0, 1] (default 0.1)")
    parser.add_argument("--steps", type=int, default=7, help="PGD steps during training (default 7)")
    parser.add_argument("--eval-steps", type=int, default=20, help="PGD steps for evaluation (default 20)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the cosine schedule")
    parser.add_argument("--beta", type=float, default=6.0, help="TRADES / MART weight (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=None, help="write/resume <method>.safetensors here")
    parser.add_argument("--own-loop", action="store_true", help="PGD-AT in a hand-written MLX loop")
    parser.add_argument("--distributed", action="store_true", help="data-parallel under mlx.launch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args()

    data = load(args)
    if args.own_loop:
        own_loop(args, data)
    else:
        compare(args, data)


if __name__ == "__main__":
    main()
