"""Where the time of a PGD attack goes: per-step cost and per-call overhead, one model and batch.

Prints, for PGD (L-inf, no random start, all steps run) on the MLP or small CNN at batch B:

  naive          Python loop, mx.grad + step + projection, mx.eval every step
  compiled       the step under mx.compile, mx.eval every step
  compiled-async the step under mx.compile, no eval until the end (graph of all steps)
  compiled-kN    N steps unrolled inside one mx.compile, eval per call
  library-uN     robust.attack with unroll=N (early_stop=False)
  core-uN        the compiled C++ engine called directly (no validation, no label checks in Python)
and the fixed per-call costs of the library: validation, label conversion, parameter flattening.

    python benchmarks/gpu/profile_attack.py --model mlp --steps 40
    MLX_MAX_OPS_PER_BUFFER=100 python benchmarks/gpu/profile_attack.py --model cnn
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import backend_description, make_model, median_time as timeit  # noqa: E402
from bench_attack import loss_fn, naive_pgd  # noqa: E402

import mlx_robust as mr  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--unrolls", nargs="+", type=int, default=[1, 5, 10, 20])
    p.add_argument("--cprofile", action="store_true", help="also cProfile 30 library calls (Python side)")
    p.add_argument("--phases", action="store_true", help="also print the C++ phase times of 3 library calls")
    p.add_argument("--only-overheads", action="store_true", help="skip the loop comparisons")
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k.startswith("MLX_")}
    print(f"{backend_description()} env={env} model={args.model} batch={args.batch} steps={args.steps}")

    mx.random.seed(0)
    model = make_model(args.model)
    model.eval()
    mx.eval(model.parameters())
    x = mx.random.uniform(shape=(args.batch, 28, 28, 1))
    y = mx.argmax(model(x), axis=-1)
    mx.eval(x, y)
    eps, steps = 0.3, args.steps
    alpha = 2.5 * eps / steps
    rows = {}
    grad = mx.grad(lambda x: loss_fn(model, x, y))
    rows["fwd+bwd"] = timeit(lambda: mx.eval(grad(x)), args.reps)
    rows["naive"] = timeit(lambda: naive_pgd(model, x, y, eps, alpha, steps), args.reps)
    if args.only_overheads:
        args.unrolls = []

    def one(x, x0):
        g = mx.grad(lambda x: loss_fn(model, x, y))(x)
        x = x + alpha * mx.sign(g)
        return mx.clip(mx.clip(x - x0, -eps, eps) + x0, 0.0, 1.0)

    step = partial(mx.compile, inputs=model.state)(one)

    def compiled(sync_each: bool):
        xa = x
        for _ in range(steps):
            xa = step(xa, x)
            if sync_each:
                mx.eval(xa)
            else:
                mx.async_eval(xa)
        mx.eval(model(xa))

    rows["compiled"] = timeit(lambda: compiled(True), args.reps)
    rows["compiled-async"] = timeit(lambda: compiled(False), args.reps)
    for k in args.unrolls:
        if steps % k:
            continue

        @partial(mx.compile, inputs=model.state)
        def stepk(xa, x0, k=k):
            for _ in range(k):
                xa = one(xa, x0)
            return xa

        def run_k(stepk=stepk, k=k):
            xa = x
            for _ in range(steps // k):
                xa = stepk(xa, x)
                mx.async_eval(xa)
            mx.eval(model(xa))

        rows[f"compiled-k{k}"] = timeit(run_k, args.reps)

    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(28, 28, 1), num_classes=10)
    fn = robust._fn
    eps_a = mx.full((args.batch,), eps)
    alpha_a = mx.full((args.batch,), alpha)
    for k in args.unrolls:
        atk = mr.PGD(eps=eps, steps=steps, step_size=alpha, random_start=False, early_stop=False, unroll=k)
        rows[f"library-u{k}"] = timeit(lambda: mx.eval(robust.attack(x, y, atk, key=mr.key(0)).x_adv), args.reps)

        def core(k=k, track_best=True):
            out = fn.run_attack(x, y, eps_a, alpha_a, (0.0, 1.0), num_classes=10, norm="linf", loss="ce",
                                steps=steps, restarts=1, random_start=False, targeted=False, track_best=track_best,
                                early_stop=False, unroll=k, key=mr.key(0), eot_samples=1, probs=None)
            mx.eval(out[0])

        rows[f"core-u{k}"] = timeit(core, args.reps)
        rows[f"core-nobest-u{k}"] = timeit(lambda k=k: core(k, track_best=False), args.reps)

    # Fixed per-call costs of the Python layer.
    rows["validate"] = timeit(lambda: mx.eval(robust.validate(x)[0]), args.reps)
    rows["flat_parameters"] = timeit(lambda: fn.flat_parameters(), args.reps)
    one_step = mr.PGD(eps=eps, steps=1, step_size=alpha, random_start=False, early_stop=False)
    rows["library-1-step"] = timeit(lambda: mx.eval(robust.attack(x, y, one_step, key=mr.key(0)).x_adv), args.reps)
    rows["naive-1-step"] = timeit(lambda: naive_pgd(model, x, y, eps, alpha, 1), args.reps)

    pgd = mr.PGD(eps=eps, steps=steps, step_size=alpha, random_start=False, early_stop=False)
    rows["library"] = timeit(lambda: mx.eval(robust.attack(x, y, pgd, key=mr.key(0)).x_adv), args.reps)
    from mlx_robust.validation import as_labels
    from mlx_robust.model import _check_finite_logits
    res = robust.attack(x, y, pgd, key=mr.key(0))
    rows["as_labels"] = timeit(lambda: as_labels(y, args.batch, 10), args.reps)
    rows["check_finite_logits"] = timeit(lambda: _check_finite_logits(res.logits), args.reps)
    for name, t in rows.items():
        print(f"  {name:22s} {t * 1e3:9.3f} ms   naive/this {rows['naive'] / t:5.2f}x", flush=True)
    if args.cprofile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(30):
            mx.eval(robust.attack(x, y, pgd, key=mr.key(0)).x_adv)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    if args.phases:
        os.environ["MLX_ROBUST_PROFILE"] = "1"
        for _ in range(3):
            mx.eval(robust.attack(x, y, pgd, key=mr.key(0)).x_adv)
            print("--", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
