"""Resident-memory growth over many attack and certify calls on one model (the leak check).

    python tests/fuzz/leak_run.py --calls 1000        # the long run (a few minutes on 2 CPUs)

Warm-up calls first (traces, MLX's allocator cache), then ``--calls`` of each; prints the growth of
resident memory (VmRSS) and exits 1 if it exceeds ``--limit`` (default 5%).
"""

from __future__ import annotations

import argparse
import gc
import sys

import mlx_robust as mr
from mlx_robust.training import fit


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--limit", type=float, default=0.05)
    args = parser.parse_args()
    xt, yt = mr.datasets.load_digits("train")
    x, y = mr.datasets.load_digits("test")
    x, y = x[:32], y[:32]
    model = fit(mr.models.MLP(64, hidden=(32,), num_classes=10), xt, yt, epochs=3)
    robust = mr.RobustModel(model, input_shape=(8, 8, 1), num_classes=10,
                            smoothing=mr.Smoothing(sigma=0.25, n0=20, n=100, alpha=0.01))
    calls = {
        "attack": lambda i: robust.attack(x, y, mr.PGD(eps=0.1, steps=5), key=mr.key(i)),
        "certify": lambda i: robust.certify(x[:8], key=mr.key(i), progress=False),
    }
    failed = False
    for name, call in calls.items():
        for i in range(args.warmup):
            call(i)
        gc.collect()
        before = rss()
        for i in range(args.calls):
            out = call(i)
            del out
        gc.collect()
        growth = (rss() - before) / before
        print(f"{name:8s} {args.calls} calls: resident memory {before / 2**20:.1f} MiB -> "
              f"{rss() / 2**20:.1f} MiB ({growth:+.2%})", flush=True)
        failed |= growth > args.limit
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
