"""Where randomized-smoothing time goes: one chunk's parts, timed separately, one model and batch.

Each row runs --calls model batches of B rows and reports samples/s and the ratio to the eager
forward (the baseline of benchmarks/bench_smoothing.py):

  forward          mx.eval(model(xb)) per call
  forward-compiled mx.compile(model), eval per call
  noise+forward    compiled: x + sigma * normal(key), model, eval per call
  chunk            compiled: noise, model, argmax, vote counts added (what the C++ loop compiles)
  chunk-async      the same, counts chained, async_eval, eval every 2 calls
  chunk-gG         G chunks in one compiled call (one normal draw of G*B rows, G forwards of B rows)
  library          robust.predict's vote counting (the C++ engine)

    python benchmarks/gpu/profile_smoothing.py --model cnn --batch 500
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attack import backend_description, make_model, timeit  # noqa: E402

import mlx_robust as mr  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cnn", choices=["mlp", "cnn"])
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    print(f"{backend_description()} model={args.model} batch={args.batch} calls={args.calls}")
    mx.random.seed(0)
    model = make_model(args.model)
    model.eval()
    mx.eval(model.parameters())
    B, calls, sigma = args.batch, args.calls, 0.25
    xb = mx.random.uniform(shape=(B, 28, 28, 1))
    x1 = xb[:1]
    keys = mx.random.split(mr.key(0), calls)
    mx.eval(xb, keys)
    classes = mx.arange(10)

    def noisy(key, rows):
        return x1 + sigma * mx.random.normal((rows, 28, 28, 1), key=key)

    cf = mx.compile(lambda x: model(x), inputs=model.state)
    nf = mx.compile(lambda key: model(noisy(key, B)), inputs=model.state)

    def chunk_body(counts, key):
        pred = mx.argmax(model(noisy(key, B)), axis=-1, keepdims=True)
        return counts + (pred == classes).astype(mx.int32).sum(0)

    ch = mx.compile(chunk_body, inputs=model.state)

    def grouped(g):
        def body(counts, key):
            z = x1 + sigma * mx.random.normal((g * B, 28, 28, 1), key=key)
            for j in range(g):
                pred = mx.argmax(model(z[j * B:(j + 1) * B]), axis=-1, keepdims=True)
                counts = counts + (pred == classes).astype(mx.int32).sum(0)
            return counts

        return mx.compile(body, inputs=model.state)

    rows = {}
    rows["forward"] = timeit(lambda: [mx.eval(model(xb)) for _ in range(calls)], args.reps)
    rows["forward-compiled"] = timeit(lambda: [mx.eval(cf(xb)) for _ in range(calls)], args.reps)
    rows["noise+forward"] = timeit(lambda: [mx.eval(nf(keys[i])) for i in range(calls)], args.reps)

    def chunk(sync_every):
        c = mx.zeros((10,), mx.int32)
        pending = []
        for i in range(calls):
            c = ch(c, keys[i])
            mx.async_eval(c)
            pending.append(c)
            if len(pending) > sync_every:
                mx.eval(pending.pop(0))
        mx.eval(c)

    rows["chunk"] = timeit(lambda: chunk(0), args.reps)
    rows["chunk-async"] = timeit(lambda: chunk(2), args.reps)
    for g in (2, 4, 8):
        fg = grouped(g)

        def run_g(fg=fg, g=g):
            c = mx.zeros((10,), mx.int32)
            pending = []
            for i in range(calls // g):
                c = fg(c, keys[i])
                mx.async_eval(c)
                pending.append(c)
                if len(pending) > 2:
                    mx.eval(pending.pop(0))
            mx.eval(c)

        rows[f"chunk-g{g}"] = timeit(run_g, args.reps)
    robust = mr.RobustModel(model, bounds=(0.0, 1.0), input_shape=(28, 28, 1), num_classes=10,
                            smoothing=mr.Smoothing(sigma=sigma, n=calls * B, batch_size=B))
    rows["library"] = timeit(lambda: mx.eval(robust.predict(x1, key=mr.key(0))), args.reps)
    base = rows["forward"]
    for name, t in rows.items():
        print(f"  {name:18s} {calls * B / t:12.0f} samples/s   ratio to forward {base / t:5.2f}", flush=True)


if __name__ == "__main__":
    main()
