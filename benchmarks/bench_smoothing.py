"""Randomized-smoothing throughput: noisy samples/s vs the model's raw forward rate, in one process.

For each model (MLP 784-256-256-10, SmallCNN conv32-pool-conv64-pool-linear) on 28x28x1 inputs at
one batch size B, prints:

  forward    samples/s of mx.eval(model(x)) on a fixed batch of B inputs, eval mode (as many
             calls as the smoothing run makes)
  compiled   the same with mx.compile(model)
  smoothing  noisy samples/s of robust.predict with Smoothing(n=chunks*B, batch_size=B): noise
             drawn, added, model run, argmax and votes counted (the C++ compiled loop), then
             PREDICT's binomial test — everything randomized smoothing does per sample
  ratio      smoothing / forward (the goal: >= 0.9)

The three runs are interleaved, repeated --reps times, and the medians reported.

    python benchmarks/bench_smoothing.py                      # both models, B = 500
    python benchmarks/bench_smoothing.py --models mlp --batch 1000 --chunks 20
"""

from __future__ import annotations

import argparse
import statistics

import mlx.core as mx
import mlx_robust as mr

from _common import backend_description, make_model, timed


def bench(kind: str, batch: int, chunks: int, inputs: int, reps: int, sigma: float) -> dict:
    mx.random.seed(0)
    model = make_model(kind)
    model.eval()
    mx.eval(model.parameters())
    xb = mx.random.uniform(shape=(batch, 28, 28, 1))
    x = mx.random.uniform(shape=(inputs, 28, 28, 1))
    mx.eval(xb, x)
    compiled = mx.compile(model)
    n = chunks * batch
    calls = inputs * chunks  # the same number of model batches in every run below
    smoothing = mr.Smoothing(sigma=sigma, n=n, batch_size=batch)
    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(28, 28, 1), num_classes=10,
                            smoothing=smoothing)

    def forward():
        for _ in range(calls):
            mx.eval(model(xb))

    def forward_compiled():
        for _ in range(calls):
            mx.eval(compiled(xb))

    def smoothed():
        mx.eval(robust.predict(x, key=mr.key(0)))

    runs = {"forward": forward, "compiled": forward_compiled, "smoothing": smoothed}
    for fn in runs.values():  # warm-up: trace, JIT-compile
        fn()
    # Interleaved repetitions, so that a busy machine slows every variant alike; medians.
    times = {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            times[k].append(timed(fn))
    rate = {k: calls * batch / statistics.median(v) for k, v in times.items()}
    return dict(model=kind, batch=batch, n=n, inputs=inputs, **rate)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--batch", type=int, default=500, help="model batch size B (default 500)")
    parser.add_argument("--chunks", type=int, default=None,
                        help="model batches per input, n = chunks * B (default: 20 on a GPU; on the CPU 8 for mlp, 2 for cnn)")
    parser.add_argument("--inputs", type=int, default=2, help="inputs smoothed per timed call")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions of each variant (median)")
    parser.add_argument("--sigma", type=float, default=0.25)
    args = parser.parse_args()

    print(f"mlx-robust {mr.__version__}, mlx {mx.__version__}, {backend_description()}")
    print(f"28x28x1 inputs, batch {args.batch}, sigma {args.sigma}, {args.inputs} inputs per smoothing call, "
          f"median of {args.reps} interleaved runs\n")
    print("| model | batch | n per input | forward samples/s | compiled forward samples/s | smoothing noisy samples/s "
          "| smoothing / forward | smoothing / compiled |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.models:
        # On a GPU, a certification-sized n (Cohen et al. use 100,000; here 20 batches = 10,000);
        # on the CPU, where MLX's kernels are slow, fewer.
        gpu = mx.default_device().type == mx.gpu
        chunks = args.chunks or (20 if gpu else {"mlp": 8, "cnn": 2}[kind])
        r = bench(kind, args.batch, chunks, args.inputs, args.reps, args.sigma)
        print(
            f"| {r['model']} | {r['batch']} | {r['n']} | {r['forward']:,.0f} | {r['compiled']:,.0f} | "
            f"{r['smoothing']:,.0f} | {r['smoothing'] / r['forward']:.2f} | "
            f"{r['smoothing'] / r['compiled']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
