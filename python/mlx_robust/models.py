"""Small reference classifiers used by the demo, the tests and the benchmarks (NHWC inputs)."""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn


class MLP(nn.Module):
    """Flatten, then ``hidden`` ReLU layers, then a linear classifier (e.g. 784-256-256-10)."""

    def __init__(self, in_features: int, hidden: Sequence[int] = (256, 256), num_classes: int = 10) -> None:
        super().__init__()
        sizes = [in_features, *hidden]
        self.layers = [nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])]
        self.head = nn.Linear(sizes[-1], num_classes)

    def __call__(self, x: mx.array) -> mx.array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = nn.relu(layer(x))
        return self.head(x)


class SmallCNN(nn.Module):
    """conv(c1)-relu-maxpool2 - conv(c2)-relu-maxpool2 - linear: the small CNN of the benchmarks.

    ``image_size`` is the side of the square NHWC input (8 for the digits, 28 for MNIST).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        channels: tuple[int, int] = (32, 64),
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        side = image_size // 4
        self.head = nn.Linear(c2 * side * side, num_classes)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.pool(nn.relu(self.conv1(x)))
        x = self.pool(nn.relu(self.conv2(x)))
        return self.head(x.reshape(x.shape[0], -1))
