"""Which GPU kernels a library PGD call runs, and for how long (CUPTI via torch.profiler).

torch's profiler records every CUDA kernel in the process, MLX's included, so it can list what
mlx-robust's compiled loop launches per call: kernel names, counts and total GPU time. MLX launches
kernels through CUDA graphs, of which CUPTI recorded about half on an H100 (20 of the 40 steps'
convolutions per call): read counts and times as lower bounds and compare them with each other.

    python benchmarks/gpu/profile_kernels.py [--model cnn|mlp] [--batch 128] [--steps 40]
"""

from __future__ import annotations

import argparse
import collections

import mlx.core as mx
import torch
from torch.profiler import ProfilerActivity, profile

import mlx_robust as mr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args()
    torch.cuda.init()
    mx.random.seed(0)
    if args.model == "mlp":
        model = mr.models.MLP(784, hidden=(256, 256), num_classes=10)
    else:
        model = mr.models.SmallCNN(in_channels=1, num_classes=10, image_size=28, channels=(32, 64))
    mx.eval(model.parameters())
    robust = mr.RobustModel(model, input_shape=(28, 28, 1), num_classes=10)
    x = mx.random.uniform(shape=(args.batch, 28, 28, 1))
    y = mx.random.randint(0, 10, (args.batch,))
    atk = mr.PGD(eps=0.3, steps=args.steps, step_size=0.01, random_start=False)
    for _ in range(3):
        mx.eval(robust.attack(x, y, atk).x_adv)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            mx.eval(robust.attack(x, y, atk).x_adv)
        mx.synchronize()
    stats = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            s = stats[ev.name[:110]]
            s[0] += 1
            s[1] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    total = sum(v[1] for v in stats.values())
    n_kernels = sum(v[0] for v in stats.values())
    print(f"{args.model}, batch {args.batch}, PGD-{args.steps}: per call {total / 5 / 1e3:.2f} ms of GPU time "
          f"in {n_kernels / 5:.0f} kernels ({n_kernels / 5 / args.steps:.1f} per step)\n")
    print("| kernel | per call | per step | GPU us per call |")
    print("|---|---|---|---|")
    for name, (n, t) in sorted(stats.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"| {name} | {n / 5:.0f} | {n / 5 / args.steps:.2f} | {t / 5:.0f} |")


if __name__ == "__main__":
    main()
