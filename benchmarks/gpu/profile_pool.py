"""Max-pooling formulations in MLX: time and exactness of each, alone and inside the benchmark CNN.

``nn.MaxPool2d(2, 2)`` reshapes (N, H, W, C) to (N, H/2, 2, W/2, 2, C), transposes the window axes
next to each other and reduces them with ``max``. This script times that against formulations that
give the same forward values, and checks whether their gradients w.r.t. the input are bit-for-bit
those of ``nn.MaxPool2d`` (ties after a ReLU are common, and ``max``'s gradient splits between them).

    python benchmarks/gpu/profile_pool.py [--batch 128] [--reps 50]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_layers import median_ms  # noqa: E402


def measure(fwd, both, x, ref: list, reps: int) -> tuple[float, float, bool]:
    """(fwd ms, fwd+bwd ms, gradient == the first variant's); the first call fills ``ref``."""
    g = both(x)
    mx.eval(g)
    if not ref:
        ref.append(g)
    same = bool(mx.array_equal(g, ref[0]).item())
    return median_ms(lambda: mx.eval(fwd(x)), reps), median_ms(lambda: mx.eval(both(x)), reps), same


def pool_nn(x):
    return nn.MaxPool2d(2, 2)(x)


def pool_reshape(x):
    n, h, w, c = x.shape
    return mx.max(x.reshape(n, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def pool_slices(x):
    a, b = x[:, 0::2, 0::2], x[:, 0::2, 1::2]
    c, d = x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    return mx.maximum(mx.maximum(a, b), mx.maximum(c, d))


@mx.custom_function
def pool_slices_exact(x):
    return pool_slices(x)


@pool_slices_exact.vjp
def _pool_slices_exact_vjp(primals, cotangent, output):
    x = primals  # the one argument itself
    n, h, w, c = x.shape
    xv = x.reshape(n, h // 2, 2, w // 2, 2, c)
    ob = mx.expand_dims(output, (2, 4))
    mask = xv == ob
    a, b = x[:, 0::2, 0::2], x[:, 0::2, 1::2]
    cc, d = x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    cnt = (a == output).astype(x.dtype) + (b == output) + (cc == output) + (d == output)
    g = mx.expand_dims(cotangent / cnt, (2, 4)) * mask
    return g.reshape(n, h, w, c)


VARIANTS = {
    "nn.MaxPool2d": pool_nn,
    "reshape, max over axes (2,4)": pool_reshape,
    "4 slices, maximum": pool_slices,
    "4 slices, tie-exact vjp": pool_slices_exact,
}


class CNN(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.head = nn.Linear(3136, 10)
        self._pool = pool

    def __call__(self, x):
        x = self._pool(nn.relu(self.conv1(x)))
        x = self._pool(nn.relu(self.conv2(x)))
        return self.head(x.reshape(x.shape[0], -1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    print(f"device {mx.default_device()}, batch {args.batch}, median of {args.reps}, ms\n")
    print("| input | formulation | fwd | fwd+bwd | grad == nn.MaxPool2d's |")
    print("|---|---|---|---|---|")
    for shape, ties in [((28, 28, 32), False), ((14, 14, 64), False), ((14, 14, 64), True)]:
        mx.random.seed(0)
        if ties:  # values in {0, 1, 2}: most windows hold a tie that no ReLU gradient masks
            x = mx.floor(mx.random.uniform(shape=(args.batch, *shape)) * 3) + 1
        else:
            x = nn.relu(mx.random.normal((args.batch, *shape)))
        wt = mx.random.normal((args.batch, shape[0] // 2, shape[1] // 2, shape[2]))
        mx.eval(x, wt)
        ref = []
        for name, f in VARIANTS.items():
            fwd = mx.compile(lambda x, f=f: f(nn.relu(x)))
            both = mx.compile(mx.grad(lambda x, f=f: mx.sum(f(nn.relu(x)) * wt)))
            tf, tb, same = measure(fwd, both, x, ref, args.reps)
            print(f"| {shape}{' ties' if ties else ''} | {name} | {tf:.3f} | {tb:.3f} | {same} |")
    print("\n| whole CNN (28x28x1) | fwd | fwd+bwd | grad == nn.MaxPool2d's |")
    print("|---|---|---|---|")
    ref = []
    mx.random.seed(1)
    x = mx.random.uniform(shape=(args.batch, 28, 28, 1))
    base = CNN(pool_nn)
    mx.eval(base.parameters())
    for name, f in VARIANTS.items():
        m = CNN(f)
        m.update(base.parameters())
        fwd = mx.compile(lambda x, m=m: m(x), inputs=m.state)
        both = mx.compile(mx.grad(lambda x, m=m: mx.sum(m(x))), inputs=m.state)
        tf, tb, same = measure(fwd, both, x, ref, args.reps)
        print(f"| {name} | {tf:.3f} | {tb:.3f} | {same} |")


if __name__ == "__main__":
    main()
