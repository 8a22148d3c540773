"""Per-call cost of checking that the model is still the one traced, against an attack call.

Every attack and smoothing call walks the module tree once (``_functional.model_arrays``): it
collects every array (the traced graph's inputs) and the tree's fingerprint, and compares the
fingerprint with the traced one. Prints, for the MLP 784-256-256-10 and the small CNN (28x28x1) and a ResNet-32-ish model of
about 100 modules (32x32x3):

  walk      model_arrays: the arrays and the fingerprint
  check     ModelFunction.check_traced: the walk plus the comparison (what each call adds)
  copy      model_copy: the shallow copy a trace (or an eager forward) runs on
  attack    robust.attack with PGD-10 (compiled, traced already), batch --batch
  share     check / attack

    python benchmarks/bench_fingerprint.py
    python benchmarks/bench_fingerprint.py --batch 128 --reps 20
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import mlx.nn as nn

import mlx_robust as mr
from _common import median_time
from mlx_robust import _functional


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm(c_out)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm(c_out)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm(c_out))
            if stride != 1 or c_in != c_out else None
        )

    def __call__(self, x: mx.array) -> mx.array:
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNetish(nn.Module):
    """ResNet-32-like (3 stages x 5 blocks, widths 16/32/64) for 32x32x3 inputs."""

    def __init__(self, blocks: int = 5, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm(16), nn.ReLU())
        layers, c = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for b in range(blocks):
                layers.append(Block(c, width, 2 if stage > 0 and b == 0 else 1))
                c = width
        self.layers = layers
        self.head = nn.Linear(c, num_classes)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.stem(x)
        for layer in self.layers:
            x = layer(x)
        return self.head(mx.mean(x, axis=(1, 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    mx.random.seed(0)
    models = {
        "MLP": (mr.models.MLP(784), (28, 28, 1)),
        "SmallCNN": (mr.models.SmallCNN(image_size=28), (28, 28, 1)),
        "ResNet-32ish": (ResNetish(), (32, 32, 3)),
    }
    for name, (model, shape) in models.items():
        model.eval()
        mx.eval(model.parameters())
        robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=shape, num_classes=10)
        x = mx.random.uniform(shape=(args.batch, *shape))
        y = mx.zeros((args.batch,), mx.int32)
        pgd = mr.PGD(eps=8 / 255, steps=10, early_stop=False, unroll=10)
        modules = len(model.named_modules())
        arrays, _ = _functional.model_arrays(model)
        walk = median_time(lambda: _functional.model_arrays(model), args.reps * 100)
        check = median_time(lambda: robust.engine.check_traced(False), args.reps * 100)
        copy = median_time(lambda: _functional.model_copy(model, training=False), args.reps * 100)
        attack = median_time(lambda: mx.eval(robust.attack(x, y, pgd, key=mr.key(0)).x_adv), args.reps)
        print(f"{name:13s} {modules:4d} modules {len(arrays):4d} arrays   walk {walk * 1e6:7.1f} us   "
              f"check {check * 1e6:7.1f} us   copy {copy * 1e6:7.1f} us   PGD-10 x{args.batch} "
              f"{attack * 1e3:8.2f} ms   share {check / attack:.3%}", flush=True)


if __name__ == "__main__":
    main()
