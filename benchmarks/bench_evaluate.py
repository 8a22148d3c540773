"""Ensemble evaluation with per-sample early stop vs the same attacks without it, in one process.

With early stop, a sample leaves an attack's batch once it is misclassified, and later attacks
only see samples every earlier attack left robust (AutoAttack's scheme). Without it, every attack
runs every step on every clean-correct sample. The ensemble's robust accuracy must be the same;
the benchmark prints both, the times and the speedup.

    python benchmarks/bench_evaluate.py                  # digits CNN, undefended, eps 0.05 0.1 0.2
    python benchmarks/bench_evaluate.py --eps 0.1 --n 200
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import mlx.core as mx

import mlx_robust as mr
from mlx_robust.cli import demo_ensemble
from mlx_robust.training import fit

from _common import backend_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", nargs="+", type=float, default=[0.05, 0.1, 0.2])
    parser.add_argument("--n", type=int, default=360, help="test images (max 360)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    print(f"mlx-robust {mr.__version__}, mlx {mx.__version__}, {backend_description()}")
    mx.random.seed(args.seed)
    x_train, y_train = mr.datasets.load_digits("train")
    x, y = mr.datasets.load_digits("test")
    x, y = x[: args.n], y[: args.n]
    model = fit(mr.models.SmallCNN(image_size=8, channels=(16, 32)), x_train, y_train, epochs=15, seed=args.seed)
    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(8, 8, 1), num_classes=10)
    attacks = demo_ensemble(0.1)
    print(f"undefended digits CNN, {x.shape[0]} images, attacks: {[a.name for a in attacks]}, eps {args.eps}\n")

    def run(early: bool):
        ens = [dataclasses.replace(a, early_stop=early) if hasattr(a, "early_stop") else a for a in attacks]
        t0 = time.perf_counter()
        rep = mr.evaluate(robust, x, y, attacks=ens, eps=args.eps, early_stop=early, key=mr.key(args.seed),
                          checks=False, progress=False)
        return rep, time.perf_counter() - t0

    run(True)  # warm-up: traces and compiles every attack once
    with_es, t_es = run(True)
    without, t_no = run(False)
    print("| eps | ensemble robust acc. (early stop) | (no early stop) |")
    print("|---|---|---|")
    for e in args.eps:
        print(f"| {e:g} | {with_es.robust_accuracy(e):.1%} | {without.robust_accuracy(e):.1%} |")
    print(f"\nwith per-sample early stop: {t_es:.2f} s; without: {t_no:.2f} s; speedup {t_no / t_es:.2f}x")


if __name__ == "__main__":
    main()
