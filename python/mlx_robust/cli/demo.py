"""``mlx-robust demo``: train a small CNN on the embedded digits, attack it, adversarially train it,
certify it. The pieces return text; :func:`demo` prints it."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

import mlx_robust as mr
from mlx_robust.attacks import PGD
from mlx_robust.cli.commands import _have_matplotlib, _write_report
from mlx_robust.robust_model import RobustModel
from mlx_robust.models import SmallCNN
from mlx_robust.defences.smoothing import Smoothing, certified_accuracy
from mlx_robust.training.loop import clean_accuracy, robust_accuracy, train
from mlx_robust.training.fit import accuracy, fit


def demo_ensemble(eps: float):
    """The demo's ensemble at one eps: standalone FGSM and PGD, then AutoAttack-style attacks."""
    return [
        mr.FGSM(eps=eps),
        mr.PGD(eps=eps, steps=20),
    ] + [a for a in _optional_attacks(eps)]


def _optional_attacks(eps: float):
    yield mr.APGD(eps=eps, steps=50)
    yield mr.APGDT(eps=eps, steps=50, n_target_classes=3)
    yield mr.Square(eps=eps, n_queries=1000)


def demo(args: argparse.Namespace) -> int:
    """Train a small CNN on the embedded digits, then evaluate it under an attack ensemble."""
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


def certified_demo_line(
    model: Any,
    x_test: mx.array,
    y_test: mx.array,
    *,
    sigma: float = 0.25,
    n0: int = 50,
    n: int = 500,
    alpha: float = 0.001,
    radii: Sequence[float] = (0.0, 0.25, 0.5),
    limit: Optional[int] = 100,
    seed: int = 0,
    plot: Optional[str] = None,
) -> str:
    """One line for ``mlx-robust demo``: certified L2 accuracy of the smoothed model on a test set.

    ``plot``: also write the certified-accuracy-vs-radius plot there (needs matplotlib).

    Randomized smoothing (Cohen et al. 2019, https://arxiv.org/abs/1902.02918) of ``model`` at
    ``sigma``, CERTIFY with ``n0``/``n`` samples at level ``alpha`` on the first ``limit`` test
    inputs (None: all), inputs in [0, 1]. The defaults take a few seconds for the demo's small CNN
    on a laptop CPU; the model is not trained with noise, which smoothing would prefer.
    """
    if limit is not None:
        x_test, y_test = x_test[:limit], y_test[:limit]
    robust = RobustModel(model, bounds=(0.0, 1.0), input_shape=tuple(x_test.shape[1:]),
                         smoothing=Smoothing(sigma=sigma, n=n, n0=n0, alpha=alpha, batch_size=min(n, 1000)))
    report = certified_accuracy(robust, x_test, y_test, radii, key=mx.random.key(seed), progress=False)
    if plot is not None:
        report.plot(plot)
    accs = ", ".join(f"{a:.1%} at r={r:g}" for r, a in zip(report.radii, report.accuracy))
    count = len(np.array(report.labels))
    which = f"first {count} test images" if limit is not None else f"{count} test images"
    return (
        f"randomized smoothing (sigma={sigma:g}, n={n}, alpha={alpha:g}): certified L2 accuracy {accs} "
        f"({which}, {report.seconds:.1f} s)"
    )


def adversarial_training_demo(
    x_train: mx.array,
    y_train: mx.array,
    x_test: mx.array,
    y_test: mx.array,
    *,
    eps: float,
    steps: int,
    epochs: int,
    seed: int,
    train_steps: int = 7,
    methods: tuple[str, ...] = ("standard", "pgd-at"),
    learning_rate: float = 3e-3,
    progress: bool = False,
) -> str:
    """Train the demo's SmallCNN with standard training and with PGD-AT (Madry et al. 2018), then
    report clean and PGD-``steps`` robust accuracy of each at L-inf ``eps``.

    Every model starts from the same initialisation (``seed``) and trains ``epochs`` epochs with
    Adam and a cosine learning-rate decay; PGD-AT uses ``train_steps`` PGD steps at ``eps``.

    Returns:
        The lines to print (a Markdown table), joined with newlines.
    """
    image_size, channels = int(x_train.shape[1]), int(x_train.shape[-1])
    n_batches = x_train.shape[0] // 64
    attack = PGD(eps=eps, steps=train_steps)
    evaluation = PGD(eps=eps, steps=steps)
    rows = []
    for method in methods:
        mx.random.seed(seed)
        model = _demo_model(image_size, channels)
        t0 = time.perf_counter()
        hist = train(
            model, x_train, y_train, epochs=epochs, batch_size=64, method=method,
            attack=None if method in ("standard", "noise") else attack,
            sigma=eps if method == "noise" else None,
            learning_rate=optim.cosine_decay(learning_rate, max(1, epochs * n_batches)),
            x_test=None, seed=seed, progress=progress,
        )
        seconds = time.perf_counter() - t0
        robust = RobustModel(model, bounds=(0.0, 1.0), input_shape=tuple(x_train.shape[1:]))
        rows.append((method, clean_accuracy(robust, x_test, y_test),
                     robust_accuracy(robust, x_test, y_test, evaluation, seed=seed), seconds, len(hist)))
    lines = [
        f"Adversarial training on {x_train.shape[0]} images ({image_size}x{image_size}x{channels}), "
        f"{epochs} epochs each; PGD-AT with PGD-{train_steps} at L-inf eps={eps:g}",
        f"| training | clean accuracy | PGD-{steps} robust accuracy (eps={eps:g}) | training time |",
        "|---|---|---|---|",
    ]
    for method, clean, rob, seconds, _ in rows:
        lines.append(f"| {_METHOD_NAMES.get(method, method)} | {clean:.1%} | {rob:.1%} | {seconds:.1f} s |")
    return "\n".join(lines)


_METHOD_NAMES = {"standard": "standard", "pgd-at": "PGD-AT", "trades": "TRADES", "mart": "MART",
                 "fgsm-rs": "FGSM-RS", "free": "Free-AT", "noise": "Gaussian noise", "mix": "clean+adv mix"}


def _demo_model(image_size: int, channels: int) -> nn.Module:
    model = SmallCNN(in_channels=channels, image_size=image_size, channels=(16, 32))
    mx.eval(model.parameters())
    return model
