"""What bounds PGD on the small CNN: each layer's forward+backward in MLX vs PyTorch, same GPU.

PGD's step is one forward and one backward (gradient w.r.t. the input) of the model; when a
framework's own kernels for that are slower, no attack loop on top can make up for it. For each
layer of the benchmark CNN (conv32-relu-pool - conv64-relu-pool - linear, 28x28x1, batch B) this
times sum(layer(x)) and its gradient w.r.t. x, synchronised, median of --reps, one process per
framework (MLX: the step under mx.compile; PyTorch: eager, as torchattacks runs it).

    python benchmarks/gpu/profile_layers.py              # both frameworks, batch 128
    python benchmarks/gpu/profile_layers.py --batch 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

# name: (input shape NHWC, description)
LAYERS = {
    "conv1": ((28, 28, 1), "conv 1->32, 3x3, pad 1"),
    "relu+pool1": ((28, 28, 32), "relu, maxpool 2x2"),
    "conv2": ((14, 14, 32), "conv 32->64, 3x3, pad 1"),
    "relu+pool2": ((14, 14, 64), "relu, maxpool 2x2"),
    "linear": ((7, 7, 64), "flatten, linear 3136->10"),
    "whole CNN": ((28, 28, 1), "the model"),
}


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def run_mlx(batch: int, reps: int) -> dict:
    import mlx.core as mx
    import mlx.nn as nn

    import mlx_robust as mr

    cnn = mr.models.SmallCNN(in_channels=1, num_classes=10, image_size=28, channels=(32, 64))
    pool = nn.MaxPool2d(2, 2)
    layers = {
        "conv1": cnn.conv1,
        "relu+pool1": lambda x: pool(nn.relu(x)),
        "conv2": cnn.conv2,
        "relu+pool2": lambda x: pool(nn.relu(x)),
        "linear": lambda x: cnn.head(x.reshape(x.shape[0], -1)),
        "whole CNN": cnn,
    }
    mx.eval(cnn.parameters())
    out = {}
    for name, layer in layers.items():
        x = mx.random.uniform(shape=(batch, *LAYERS[name][0]))
        fwd = mx.compile(lambda x, layer=layer: layer(x), inputs=cnn.state)
        both = mx.compile(mx.grad(lambda x, layer=layer: mx.sum(layer(x))), inputs=cnn.state)
        out[name] = (median_ms(lambda: mx.eval(fwd(x)), reps), median_ms(lambda: mx.eval(both(x)), reps))
    return out


def run_torch(batch: int, reps: int) -> dict:
    import torch
    import torch.nn as tnn

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    conv1, conv2 = tnn.Conv2d(1, 32, 3, padding=1).to(dev), tnn.Conv2d(32, 64, 3, padding=1).to(dev)
    head = tnn.Linear(3136, 10).to(dev)
    pool = tnn.MaxPool2d(2)
    cnn = tnn.Sequential(conv1, tnn.ReLU(), pool, conv2, tnn.ReLU(), pool, tnn.Flatten(), head).eval()
    layers = {
        "conv1": conv1,
        "relu+pool1": lambda x: pool(torch.relu(x)),
        "conv2": conv2,
        "relu+pool2": lambda x: pool(torch.relu(x)),
        "linear": lambda x: head(x.flatten(1)),
        "whole CNN": cnn,
    }
    out = {}
    for name, layer in layers.items():
        h, w, c = LAYERS[name][0]
        x = torch.rand(batch, c, h, w, device=dev)

        def fwd():
            with torch.no_grad():
                layer(x)
            sync()

        def both():
            xr = x.clone().requires_grad_(True)
            torch.autograd.grad(layer(xr).sum(), xr)
            sync()

        out[name] = (median_ms(fwd, reps), median_ms(both, reps))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--framework", choices=["mlx", "torch"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    if args.framework:
        run = run_mlx if args.framework == "mlx" else run_torch
        print(json.dumps(run(args.batch, args.reps)))
        return
    res = {}
    for fw in ("torch", "mlx"):
        cmd = [sys.executable, __file__, "--framework", fw, "--batch", str(args.batch), "--reps", str(args.reps)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.stderr.write(proc.stderr)
            raise SystemExit(f"{fw} failed")
        res[fw] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"batch {args.batch}, synchronised per call, median of {args.reps} (ms)\n")
    print("| layer | what | torch fwd | MLX fwd | torch fwd+bwd | MLX fwd+bwd | MLX / torch (fwd+bwd) |")
    print("|---|---|---|---|---|---|---|")
    for name, (_, what) in LAYERS.items():
        tf, tb = res["torch"][name]
        mf, mb = res["mlx"][name]
        print(f"| {name} | {what} | {tf:.3f} | {mf:.3f} | {tb:.3f} | {mb:.3f} | {mb / tb:.2f}x |")


if __name__ == "__main__":
    main()
