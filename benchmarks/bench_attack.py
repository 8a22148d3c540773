"""PGD speed: mlx-robust's compiled C++ loop vs plain-MLX loops, measured in one process.

For each model (MLP 784-256-256-10, small CNN conv32-pool-conv64-pool-linear) on 28x28x1 inputs
at one batch size, prints the wall time of PGD-10/40 (L-inf, no random start, all steps run) for:

  naive     the textbook Python loop: mx.grad, sign step, projection, mx.eval every step
  compiled  the same step under mx.compile (the model's state as compile inputs)
  library   robust.attack(...) with early_stop=False (same work as the loops above)

The library returns per-sample success and logits on x_adv, so both loops end with the one
forward pass on x_adv that a user needs for the same answer (robust accuracy); without it they
would be one forward cheaper (about 0.65 of a step on the CPU MLP).

and each as a ratio to steps x (the model's own forward+backward time w.r.t. the input).
Also prints the library with early stop (its default, same result), which drops samples whose
prediction already changed; on these untrained models most flip within a few steps, so that
column shows the mechanism, not what a robust model would gain.

    python benchmarks/bench_attack.py                 # both models, PGD-10 and PGD-40, batch 128
    python benchmarks/bench_attack.py --models mlp --steps 10 --reps 3
"""

from __future__ import annotations

import argparse
from functools import partial

import mlx.core as mx
import mlx.nn as nn

import mlx_robust as mr
from _common import backend_description, make_model, median_time


def loss_fn(model, x, y):
    return nn.losses.cross_entropy(model(x), y, reduction="sum")


def naive_pgd(model, x0, y, eps, alpha, steps):
    grad = mx.grad(lambda x: loss_fn(model, x, y))
    x = x0
    for _ in range(steps):
        g = grad(x)
        x = x + alpha * mx.sign(g)
        x = mx.clip(mx.clip(x - x0, -eps, eps) + x0, 0.0, 1.0)
        mx.eval(x)
    mx.eval(model(x))  # score x_adv: the library's result includes this
    return x


def make_compiled_step(model, eps, alpha):
    @partial(mx.compile, inputs=model.state)
    def step(x, x0, y):
        g = mx.grad(lambda x: loss_fn(model, x, y))(x)
        x = x + alpha * mx.sign(g)
        return mx.clip(mx.clip(x - x0, -eps, eps) + x0, 0.0, 1.0)

    return step


def compiled_pgd(model, step, x0, y, steps):
    x = x0
    for _ in range(steps):
        x = step(x, x0, y)
        mx.eval(x)
    mx.eval(model(x))  # score x_adv: the library's result includes this
    return x


def bench(kind: str, batch: int, steps_list, reps: int, eps: float, unroll=None) -> list[dict]:
    mx.random.seed(0)
    model = make_model(kind)
    model.eval()
    mx.eval(model.parameters())
    x = mx.random.uniform(shape=(batch, 28, 28, 1))
    y = mx.argmax(model(x), axis=-1)  # the model's own predictions: success = prediction changed
    mx.eval(x, y)
    grad = mx.grad(lambda x: loss_fn(model, x, y))
    t_fb = median_time(lambda: mx.eval(grad(x)), reps * 3)
    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(28, 28, 1), num_classes=10)
    rows = []
    for steps in steps_list:
        alpha = 2.5 * eps / steps
        step = make_compiled_step(model, eps, alpha)
        cfg = dict(eps=eps, steps=steps, step_size=alpha, random_start=False)
        lib = mr.PGD(**cfg, early_stop=False, unroll=unroll)
        lib_es = mr.PGD(**cfg, early_stop=True, unroll=unroll)
        times = {
            "naive": median_time(lambda: naive_pgd(model, x, y, eps, alpha, steps), reps),
            "compiled": median_time(lambda: compiled_pgd(model, step, x, y, steps), reps),
            "library": median_time(lambda: mx.eval(robust.attack(x, y, lib, key=mr.key(0)).x_adv), reps),
            "library+early-stop": median_time(lambda: mx.eval(robust.attack(x, y, lib_es, key=mr.key(0)).x_adv), reps),
        }
        rows.append(dict(model=kind, steps=steps, batch=batch, fwd_bwd=t_fb, times=times,
                         unroll=unroll or robust._fn.chosen_unroll((batch, 28, 28, 1))))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 40])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=20, help="timed repetitions (median reported)")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--unroll", nargs="+", type=int, default=[0],
                        help="library steps per compiled call; 0 = chosen by timing (default)")
    args = parser.parse_args()

    print(f"mlx-robust {mr.__version__}, mlx {mx.__version__}, {backend_description()}")
    print(f"batch {args.batch}, 28x28x1, PGD L-inf eps={args.eps}, no random start, median of {args.reps}\n")
    print("| model | PGD | fwd+bwd ms | naive ms | compiled ms | library ms | library+early-stop ms "
          "| naive/lib | compiled/lib | lib / (steps x fwd+bwd) | unroll |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind in args.models:
        rows = [r for k in args.unroll for r in bench(kind, args.batch, args.steps, args.reps, args.eps, k or None)]
        for r in rows:
            t = r["times"]
            ms = {k: v * 1e3 for k, v in t.items()}
            print(
                f"| {r['model']} | {r['steps']} | {r['fwd_bwd'] * 1e3:.2f} | {ms['naive']:.1f} | "
                f"{ms['compiled']:.1f} | {ms['library']:.1f} | {ms['library+early-stop']:.1f} | "
                f"{t['naive'] / t['library']:.2f}x | {t['compiled'] / t['library']:.2f}x | "
                f"{t['library'] / (r['steps'] * r['fwd_bwd']):.2f} | {r['unroll']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
